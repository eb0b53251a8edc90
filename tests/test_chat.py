"""Chat: templates rendered as transformers renders them (the oracle), generation that
ends at the end-of-turn token, and `--chat` on the command line, one turn and a whole
conversation. A tiny random Llama with SmolLM2's template stands in for a real model;
the slow test at the end asks SmolLM2 itself."""

import json
import os
import pty
import re
import shutil
import subprocess
import sys

import jinja2
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer

import edgegen.runtime
from edgegen.cli import main
from edgegen.errors import ChatError
from edgegen.export import export_bundle
from edgegen.importers.pretrained import import_pretrained
from edgegen.runtime.generator import Generator
from edgegen.tokenizer import HFTokenizer
from tests.hf_tokenizers import byte_level_bpe, llama_bpe
from tests.test_import_hf import hf_model  # a tiny random Llama, untied

transformers = pytest.importorskip("transformers")

SMOLLM2 = (  # SmolLM2-135M-Instruct's, as its GGUF file holds it: a default system message
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (  # Meta's Llama 2 chat template: bos_token, eos_token and raise_exception
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
TOJSON = """\
{% set today = strftime_now("%d %b %Y") %}
{% for message in messages %}
    {% if loop.index0 > 3 %}{% break %}{% endif %}
    <|im_start|>{{ message['role'] }}
    {{ message['content'] | tojson }} {{ message | tojson(sort_keys=True) }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant (today is {{ today }})
{% endif %}
"""
CHATML = dict(bos_token="<|im_start|>", eos_token="<|im_end|>")
TEMPLATES = {  # name: (template, tokenizer.json, special tokens, add_bos_token)
    "smollm2": (SMOLLM2, byte_level_bpe, CHATML, False),
    "llama2": (LLAMA2, llama_bpe, dict(bos_token="<s>", eos_token="</s>"), True),
    "tojson": (TOJSON, byte_level_bpe, CHATML, False),
}
UNICODE = 'café 東京 🚀 <b>&amp;</b> "quoted"\n\tdef f(x)'
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": UNICODE}],
    [
        {"role": "user", "content": " The quick brown fox "},
        {"role": "assistant", "content": "jumps.", "name": "fox"},
        {"role": "user", "content": "Over what?"},
    ],
]
FITTING = CONVERSATIONS[:2]  # with 16 new tokens in the tiny model's context of 128
END = 2  # <|im_end|> in the byte-level tokenizer: the end of a turn
GREEDY = dict(temperature=0, max_new_tokens=16)


def tokenizers(name):
    """transformers' tokenizer and edgegen's, from the same files and settings."""
    template, tokenizer_json, special, add_bos = TEMPLATES[name]
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json()), chat_template=template, **special
    )
    config = dict(special, chat_template=template, add_bos_token=add_bos)
    return theirs, HFTokenizer.from_hf(tokenizer_json(), config)


def offline(tokenizer) -> Generator:
    """A Generator with no model behind it: enough to render and encode chats."""
    return Generator(None, {}, tokenizer, {}, "none")


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_the_prompt_and_its_ids_equal_apply_chat_template(name, messages):
    theirs, ours = tokenizers(name)
    kw = dict(add_generation_prompt=True)
    text = theirs.apply_chat_template(messages, tokenize=False, **kw)
    ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    assert offline(ours).render_chat(messages) == text
    assert offline(ours).encode_chat(messages) == ids
    bos = ours.special_tokens()["bos_token"]
    assert ids.count(ours.bos_id) == text.count(bos) > 0  # written as text, read as one id


def test_the_template_writes_its_default_system_message():
    _, ours = tokenizers("smollm2")
    text = offline(ours).render_chat(CONVERSATIONS[0])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    chosen = offline(ours).render_chat(CONVERSATIONS[1])
    assert "SmolLM" not in chosen and chosen.startswith("<|im_start|>system\nBe brief.")


def test_bos_is_added_once_when_the_tokenizer_wants_one():
    """A template that writes BOS gets no second one; one that does not gets it added,
    where transformers' apply_chat_template would leave it out."""
    _, ours = tokenizers("llama2")
    ids = offline(ours).encode_chat(CONVERSATIONS[0])
    assert ids[:2] != [ours.bos_id] * 2 and ids[0] == ours.bos_id
    config = dict(CHATML, chat_template=SMOLLM2, add_bos_token=True)
    bos_wanted = HFTokenizer.from_hf(byte_level_bpe(), dict(config, bos_token="<|endoftext|>"))
    plain, _ = tokenizers("smollm2")
    hf_ids = plain.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)["input_ids"]
    assert offline(bos_wanted).encode_chat(CONVERSATIONS[0]) == [bos_wanted.bos_id, *hf_ids]


def test_raise_exception_in_a_template_is_a_one_line_error():
    theirs, ours = tokenizers("llama2")
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError):
        theirs.apply_chat_template(two_users, tokenize=False)
    refusal = "the chat template cannot render these messages: Conversation roles must alternate"
    with pytest.raises(ChatError, match=f"^{re.escape(refusal)}") as e:
        offline(ours).render_chat(two_users)
    assert "\n" not in str(e.value)


BAD_MESSAGES = {
    "not a list": ("Hi", "messages must be a non-empty list"),
    "a dict": ({"role": "user", "content": "Hi"}, "got dict"),
    "empty": ([], "got an empty list"),
    "not a dict": (["Hi"], "message 0 must be a dict (role, content), got str"),
    "no role": ([{"content": "Hi"}], "message 0 has no 'role'"),
    "no content": ([{"role": "user"}], "message 0 has no 'content'"),
    "content None": ([{"role": "user", "content": None}], "content must be text, got NoneType"),
    "content list": ([{"role": "user", "content": [{"type": "text"}]}], "got list"),
    "role int": ([{"role": 1, "content": "Hi"}], "message 0: role must be text, got int"),
    "surrogate": ([{"role": "user", "content": "a\ud800"}], "lone surrogate at character 1"),
}


@pytest.mark.parametrize("case", BAD_MESSAGES)
def test_bad_messages_are_one_line_errors(case):
    messages, message = BAD_MESSAGES[case]
    _, ours = tokenizers("smollm2")
    with pytest.raises(ChatError, match=re.escape(message)) as e:
        offline(ours).render_chat(messages)
    assert "\n" not in str(e.value)


def test_a_template_that_does_not_parse_is_a_one_line_error():
    config = dict(CHATML, chat_template="{% for m in messages %}{{ m.content }")
    broken = HFTokenizer.from_hf(byte_level_bpe(), config)
    with pytest.raises(ChatError, match=r"^the chat template does not parse: line 1: "):
        offline(broken).render_chat(CONVERSATIONS[0])


# --- a tiny random Llama with SmolLM2's template, imported and exported ---------------


def hf_greedy(model, tokenizer, messages, n, **kw):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kw
        )
    return out[0, ids.shape[1] :].tolist()


def end_the_turn_early(model, tokenizer):
    """A random model seldom says <|im_end|>: make its output row a slightly larger copy
    of the row of a token it says a few tokens into the answer, so it ends there."""
    said = hf_greedy(model, tokenizer, CONVERSATIONS[0], 12, eos_token_id=[])
    k = next(i for i in range(3, 12) if said[i] not in said[:i])
    with torch.no_grad():
        model.lm_head.weight[END] = model.lm_head.weight[said[k]] * 1.01


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model = hf_model("llama", dict(num_attention_heads=4, num_key_value_heads=2))
    tokenizer, _ = tokenizers("smollm2")
    end_the_turn_early(model, tokenizer)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    import_pretrained(root / "hf", root / "ck")
    export_bundle(root / "ck", root / "bundle", formats=["onnx"])
    return model, tokenizer, root / "ck", root / "bundle"


@pytest.fixture(scope="module")
def generator(tiny):
    return edgegen.runtime.load(tiny[3])


def test_the_bundle_carries_the_template_and_renders_as_transformers(tiny, generator):
    _, tokenizer, _, _ = tiny
    for messages in CONVERSATIONS:
        kw = dict(add_generation_prompt=True)
        assert generator.render_chat(messages) == tokenizer.apply_chat_template(
            messages, tokenize=False, **kw
        )
        assert generator.encode_chat(messages) == tokenizer.apply_chat_template(
            messages, return_dict=False, **kw
        )


def test_chat_stops_at_the_end_of_turn_and_leaves_it_out(tiny, generator):
    model, tokenizer, _, _ = tiny
    theirs = hf_greedy(model, tokenizer, CONVERSATIONS[0], 16, eos_token_id=END)
    assert theirs[-1] == END and len(theirs) > 3  # transformers keeps the end token
    result = generator.chat(CONVERSATIONS[0], **GREEDY)
    assert result.finish_reason == "eos"
    assert result.token_ids == theirs[:-1]
    assert result.text == tokenizer.decode(theirs[:-1]) and "<|im_end|>" not in result.text


def test_streaming_chat_equals_chat(generator):
    for messages in FITTING:
        result = generator.chat(messages, **GREEDY)
        assert "".join(generator.stream_chat(messages, **GREEDY)) == result.text


def test_chat_batch_rows_equal_each_chat_alone(generator):
    batch = generator.chat_batch(FITTING, **GREEDY)
    alone = [generator.chat(m, **GREEDY) for m in FITTING]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]


# --- the command line ----------------------------------------------------------------

ARGS = ["--temperature", "0", "--max-new-tokens", "8"]
SHORT = dict(temperature=0, max_new_tokens=8)


def invoke(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def user(text):
    return {"role": "user", "content": text}


def test_cli_one_turn_with_and_without_a_system_message(tiny, generator):
    bundle = tiny[3]
    result = invoke("generate", bundle, "--chat", "--prompt", "Hi", *ARGS)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == generator.chat([user("Hi")], **SHORT).text + "\n"
    system = [{"role": "system", "content": "Be brief."}, user("Hi")]
    result = invoke("generate", bundle, "--chat", "--system", "Be brief.", "--prompt", "Hi", *ARGS)
    assert result.stdout == generator.chat(system, **SHORT).text + "\n"
    streamed = invoke("generate", bundle, "--chat", "--stream", "--prompt", "Hi", *ARGS)
    assert streamed.stdout == generator.chat([user("Hi")], **SHORT).text + "\n"


def test_cli_several_prompts_are_a_batch_of_one_turn_chats(tiny, generator):
    prompts = ["Hi", "The fox?"]
    args = [a for p in prompts for a in ("--prompt", p)]
    result = invoke("generate", tiny[3], "--chat", *args, *ARGS, "--json")
    rows = json.loads(result.stdout)
    assert [r["messages"] for r in rows] == [[user(p)] for p in prompts]
    assert [r["text"] for r in rows] == [generator.chat([user(p)], **SHORT).text for p in prompts]
    text = invoke("generate", tiny[3], "--chat", *args, *ARGS).stdout
    assert text.startswith("--- 'Hi' (") and "\n--- 'The fox?' (" in text


def test_cli_sample_chats_through_eager_pytorch_alike(tiny, generator):
    result = invoke("sample", tiny[2], "--chat", "--prompt", "Hi", *ARGS)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == generator.chat([user("Hi")], **SHORT).text + "\n"


BRIEF = {"role": "system", "content": "Be brief."}  # shorter than the default: more turns fit


def conversation_answers(generator, lines):
    """What the CLI should answer to `lines`, each turn with the history before it."""
    history, answers = [BRIEF], []
    for line in lines:
        history.append(user(line))
        answers.append(generator.chat(history, **SHORT).text)
        history.append({"role": "assistant", "content": answers[-1]})
    return answers


def edgegen_process(*args, **kw):
    command = [sys.executable, "-m", "edgegen", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_a_conversation_on_stdin_keeps_its_history_and_ends_at_an_empty_line(tiny, generator):
    chat = ["generate", tiny[3], "--chat", "--system", BRIEF["content"], *ARGS]
    proc = edgegen_process(*chat, stdin=subprocess.PIPE)
    out, err = proc.communicate(b"Hi\nThe fox?\n\nnever read\n", timeout=120)
    assert proc.returncode == 0, err
    answers = conversation_answers(generator, ["Hi", "The fox?"])
    assert out.decode() == "".join(a + "\n" for a in answers)
    assert err == b""  # not a terminal: no prompts, no hints


def test_a_conversation_on_a_terminal_prompts_and_ends_at_ctrl_d(tiny, generator):
    terminal, stdin = pty.openpty()
    chat = ["generate", tiny[3], "--chat", "--system", BRIEF["content"], "--stream", *ARGS]
    proc = edgegen_process(*chat, stdin=stdin)
    os.close(stdin)
    os.write(terminal, b"Hi\n\x04")  # a line, then Ctrl-D at the start of the next
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(terminal)
    assert proc.returncode == 0, err
    assert out.decode() == conversation_answers(generator, ["Hi"])[0] + "\n"
    assert err.decode().startswith("(an empty line or Ctrl-D ends the conversation)\n> ")


def test_a_conversation_that_outgrows_the_context_says_so_in_one_line(tiny):
    lines = "The quick brown fox jumps over the lazy dog.\n" * 10
    result = invoke("generate", tiny[3], "--chat", *ARGS, input=lines)
    assert result.exit_code == 1
    assert result.stdout.count("\n") >= 1  # the turns that fitted were answered
    assert result.stderr.startswith("error: the conversation outgrew the model's context: ")
    assert result.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def no_template(tiny, tmp_path_factory):
    """The tiny bundle with its template taken out, as a base model's bundle has none."""
    bundle = tmp_path_factory.mktemp("plain") / "bundle"
    shutil.copytree(tiny[3], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["tokenizer"]["spec"]["chat_template"] = None
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


NO_TEMPLATE = "this model has no chat template; give it plain text to continue"


@pytest.mark.parametrize("prompt", [["--prompt", "Hi"], []])
def test_a_bundle_without_a_template_says_so(no_template, prompt):
    result = invoke("generate", no_template, "--chat", *prompt, input="Hi\n")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == f"error: {NO_TEMPLATE}\n"
    with pytest.raises(ChatError, match="no chat template"):
        edgegen.runtime.load(no_template).chat([user("Hi")])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--system", "x", "--prompt", "Hi"], "--system needs --chat"),
        (["--chat", "--json"], "--json with --chat needs --prompt"),
        (["--chat", "--stream", "--prompt", "a", "--prompt", "b"], "--stream takes a single"),
    ],
)
def test_chat_usage_errors(tiny, args, message):
    result = invoke("generate", tiny[3], *args)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {message}")


# --- the real model -------------------------------------------------------------------

FRANCE = "What is the capital of France?"
SUMMARIZE = (
    "Summarize in one sentence: The Transformer replaced recurrence with self-attention, "
    "which lets every token look at every other token and trains in parallel on GPUs."
)
TRANSLATE = "Translate into French: The weather is nice today and I am going to the beach."


@pytest.fixture(scope="module")
def smollm2_chat(smollm2):
    return edgegen.runtime.load(smollm2[1].directory)


@pytest.mark.slow
def test_smollm2_answers_summarizes_and_translates(smollm2_chat):
    smollm2 = smollm2_chat
    greedy = dict(temperature=0, max_new_tokens=96)
    capital = smollm2.chat([user(FRANCE)], **greedy)
    assert "Paris" in capital.text, capital.text
    for prompt in (SUMMARIZE, TRANSLATE):
        answer = smollm2.chat([user(prompt)], **greedy)
        print(f"{prompt}\n-> {answer.text!r}")
        assert answer.finish_reason == "eos" and answer.text.strip(), answer
        assert "<|im_end|>" not in answer.text
