"""The server on the real SmolLM2-135M-Instruct (fp32, CPU) with a PEFT adapter: greedy completions
through the `openai` client equal transformers' generate (PeftModel for the adapter), alone and 8 in
flight with the base and the adapter interleaved; chat with the tokenizer's template equals
transformers' `apply_chat_template` + `generate`. `make test-real`."""

import concurrent.futures as cf

import openai
import pytest
import torch

from tests.serve_fixtures import ServerThread, serve_args

pytestmark = pytest.mark.real
NEW = 24


@pytest.fixture(scope="module")
def adapter_dir(smollm2_dir, tmp_path_factory):
    from tests.helpers import write_peft_adapter

    return write_peft_adapter(smollm2_dir, tmp_path_factory.mktemp("adapter"), 8, 16, ["q_proj", "v_proj"],
                              seed=0, b_scale=0.1)


@pytest.fixture(scope="module")
def server(smollm2_dir, adapter_dir):
    from flacuna_jax.serve.__main__ import build_app

    app, engine = build_app(serve_args(smollm2_dir, {"tuned": adapter_dir}, max_model_len=512))
    srv = ServerThread(app, engine).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=1800) as c:
        yield c


@pytest.fixture(scope="module")
def references(smollm2_dir, adapter_dir):
    from peft import PeftModel

    from tests.helpers import hf_reference

    return {"smollm2": hf_reference(smollm2_dir),
            "tuned": PeftModel.from_pretrained(hf_reference(smollm2_dir), str(adapter_dir)).eval()}


def hf_greedy(ref, prompt, eos=2):
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    row = out[0, len(prompt):].tolist()
    return row[:row.index(eos) + 1] if eos in row else row


def test_greedy_completions_equal_transformers_and_peft(client, references, smollm2_dir):
    from flacuna_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
             "The three primary colors are", "Water boils at", "List three fruits:", "In 1969, humans",
             "The best way to learn a language is"]
    names = ["smollm2", "tuned"] * 4
    prompts = [tok(t)["input_ids"] for t in texts]
    expected = [hf_greedy(references[n], p) for n, p in zip(names, prompts)]
    assert expected[1] != hf_greedy(references["smollm2"], prompts[1])  # the adapter changes the reply

    def ours(k):
        r = client.completions.create(model=names[k], prompt=prompts[k], max_tokens=NEW, temperature=0,
                                      extra_body={"return_token_ids": True})
        return r.choices[0].token_ids

    assert [ours(0), ours(1)] == expected[:2]  # alone
    with cf.ThreadPoolExecutor(8) as pool:  # 8 in flight, base and adapter interleaved
        assert list(pool.map(ours, range(8))) == expected


def test_chat_with_the_tokenizer_template_equals_transformers(client, references, smollm2_dir):
    from flacuna_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    messages = [{"role": "user", "content": "What is the tallest mountain on Earth?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    for name in ("smollm2", "tuned"):
        expected = tok.decode(hf_greedy(references[name], list(ids)), skip_special_tokens=True)
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=NEW, temperature=0,
                                           extra_body={"template": "tokenizer"})
        assert r.choices[0].message.content == expected
        assert r.usage.prompt_tokens == len(ids) and expected
