import torch
from model import WordLM

text = "the cat sat on the mat <eos> the dog sat on the rug <eos>".split() * 20
words = list(dict.fromkeys(text))  # id = position in this list
open("words.txt", "w").write("\n".join(words) + "\n")
ids = torch.tensor([words.index(w) for w in text])

torch.manual_seed(0)
model = WordLM(len(words))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(100):
    x, y = ids[:-1, None], ids[1:, None]  # [seq, batch]
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    opt.zero_grad(), loss.backward(), opt.step()
torch.save(model.state_dict(), "wordlm.pt")
