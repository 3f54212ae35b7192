"""Structured output (StructuredOutputsParams): every output finished by "stop" obeys its
constraint (choice, regex, JSON schema, EBNF, any JSON object), greedy and sampled, n > 1;
greedy tokens equal transformers' with the same xgrammar mask; unconstrained rows of a mixed
batch are untouched; preemption mid-grammar; bad specifications refused; the bitmask itself
(vocabulary edge, byte-level and SentencePiece vocabularies); run-batch's response_format."""

import json
import os
import pickle
import re
from typing import Any

import pytest
import torch

from nanovllm import LLM, SamplingParams, StructuredOutputsParams
from nanovllm.entrypoints.run_batch import run_batch, sampling_params
from nanovllm.kernels import HAS_TRITON
from nanovllm.structured.grammar import GrammarCompiler
from nanovllm.structured.masks import GrammarMasks, apply_bitmask_torch
from nanovllm.utils.dummy import train_tokenizer

MAX_MODEL_LEN = 256
PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def add(a, b):",
    "Numbers: 0 1",
    "Once upon a time",
]  # as many as CASES

# A schema whose language is finite (bounded strings and numbers, no free whitespace below),
# so a random model reaches its end well inside max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["red", "green"]},
    },
    "required": ["name", "age", "ok", "tag"],
}
REGEX = r"[a-z]{1,5}@[0-9]{2,3}\.(com|org)"
GRAMMAR = 'root ::= "(" num (" + " num){0,2} ")"\nnum ::= [1-9] [0-9]{0,2}'
GRAMMAR_RE = r"\([1-9][0-9]{0,2}( \+ [1-9][0-9]{0,2}){0,2}\)"
CHOICES = ["yes", "no", "maybe so", 'say "hi"\n']
# vLLM's documented grammar example is Lark (rules with ":", a start rule)
LARK = """
?start: select_statement
?select_statement: "SELECT " column " from " table
?column: "col_1" | "col_2"
?table: "table_1" | "table_2"
"""
LARK_RE = r"SELECT col_[12] from table_[12]"


def check_schema(text: str) -> None:
    """text is a JSON object of SCHEMA (every field present, typed and in range)."""
    obj = json.loads(text)
    assert list(obj) == ["name", "age", "ok", "tag"]
    assert re.fullmatch(r"[a-z]{1,6}", obj["name"])
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 120
    assert isinstance(obj["ok"], bool)
    assert obj["tag"] in ("red", "green")


CASES = {
    "choice": (
        StructuredOutputsParams(choice=CHOICES),
        lambda text: text in CHOICES,
    ),
    "regex": (StructuredOutputsParams(regex=REGEX), lambda text: re.fullmatch(REGEX, text)),
    "json": (
        StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
        lambda text: check_schema(text) is None,
    ),
    "grammar": (
        StructuredOutputsParams(grammar=GRAMMAR),
        lambda text: re.fullmatch(GRAMMAR_RE, text),
    ),
    "lark": (StructuredOutputsParams(grammar=LARK), lambda text: re.fullmatch(LARK_RE, text)),
}


@pytest.fixture(scope="module")
def llm(tiny_model_dir: str) -> LLM:
    engine = LLM(tiny_model_dir, max_model_len=MAX_MODEL_LEN)
    yield engine
    engine.shutdown()


# -- the API ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of json, regex, choice, grammar, json_object; got none"),
        ({"regex": "a+", "choice": ["a"]}, "got regex and choice"),
        ({"json": {"type": "object"}, "json_object": True}, "got json and json_object"),
        ({"choice": []}, "choice must not be empty"),
        ({"choice": "yes"}, "choice must be a list of str"),
        ({"choice": ["a", 1]}, "choice entries must be str"),
        ({"regex": "(ab"}, "invalid regex in structured_outputs.regex: "),
        ({"regex": ""}, "regex must be a non-empty str"),
        ({"json": {"type": "foo"}}, "invalid JSON schema in structured_outputs.json: "),
        ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
        ({"json": [1, 2]}, "must be a JSON schema"),
        ({"grammar": "root ::= "}, "invalid grammar in structured_outputs.grammar: "),
        ({"grammar": 'start ::= "a"'}, 'root rule with name "root" is not found'),
        ({"grammar": "start: foo"}, "unknown name 'foo'"),  # Lark
        ({"json_object": "yes"}, "json_object must be True or None"),
        ({"regex": "a", "whitespace_pattern": " *"}, "whitespace_pattern is not supported"),
        ({"regex": "a", "disable_fallback": 1}, "disable_fallback must be a bool"),
    ],
)
def test_bad_specs_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        StructuredOutputsParams(**kwargs)
    assert message in str(info.value)
    assert "/project/" not in str(info.value)  # xgrammar's source location is cut off


def test_sampling_params_checks() -> None:
    spec = StructuredOutputsParams(regex="a+")
    assert SamplingParams(structured_outputs=spec).structured_outputs is spec
    with pytest.raises(ValueError, match="min_tokens=2 cannot be combined with structured"):
        SamplingParams(min_tokens=2, structured_outputs=spec)
    with pytest.raises(ValueError, match="must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"regex": "a+"})
    # n > 1: every completion keeps the constraint
    assert SamplingParams(n=3, structured_outputs=spec).for_completion(2).structured_outputs is spec


def test_json_forms_share_one_key() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str
        age: int

    schema = Person.model_json_schema()
    keys = {
        StructuredOutputsParams(json=Person).key,
        StructuredOutputsParams(json=schema).key,
        StructuredOutputsParams(json=json.dumps(schema, indent=2)).key,
    }
    assert len(keys) == 1
    # pickled for data-parallel replicas, even with a class defined in this function
    again = pickle.loads(pickle.dumps(StructuredOutputsParams(json=Person)))
    assert again.key in keys and again.json == again.key[1]
    compact = StructuredOutputsParams(json=schema, disable_any_whitespace=True).key
    assert compact not in keys
    assert StructuredOutputsParams(json_object=True).kind == "json_object"


# -- generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_obey_their_constraint(llm: LLM, case: str, temperature: float) -> None:
    spec, valid = CASES[case]
    params = SamplingParams(
        temperature=temperature, max_tokens=64, seed=7, n=2, structured_outputs=spec
    )
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out in outs:
        assert len(out.outputs) == 2
        for completion in out.outputs:
            # the language is finite: every completion ends by the grammar, with EOS
            assert completion.finish_reason == "stop", completion
            assert completion.token_ids[-1] in llm.config.eos_token_ids
            assert valid(completion.text), completion.text
    if temperature > 0:  # sampling explores: not every completion is the same
        assert len({c.text for out in outs for c in out.outputs}) > 1


def test_json_object_and_free_whitespace(llm: LLM) -> None:
    params = [
        SamplingParams(temperature=t, max_tokens=48, seed=s, structured_outputs=spec)
        for spec in (
            StructuredOutputsParams(json_object=True),
            StructuredOutputsParams(json=SCHEMA),  # any whitespace between JSON tokens
        )
        for t, s in ((0.0, None), (1.0, 1), (1.0, 2), (1.0, 3))
    ]
    outs = llm.generate(["Hello"] * len(params), params, use_tqdm=False)
    stopped = 0
    for params_i, out in zip(params, outs, strict=True):
        completion = out.outputs[0]
        assert completion.text.lstrip().startswith("{")
        if completion.finish_reason == "stop":
            stopped += 1
            if params_i.structured_outputs.kind == "json_object":
                assert isinstance(json.loads(completion.text), dict)
            else:
                check_schema(completion.text)
    assert stopped >= 2


def test_grammar_compiled_once_per_constraint(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"x": {"enum": [1, 2, 3]}}, "required": ["x"]}
    before = _compiled(llm)
    params = [
        SamplingParams(
            temperature=0,
            max_tokens=16,
            structured_outputs=StructuredOutputsParams(
                json=dict(schema), disable_any_whitespace=True
            ),
        )
        for _ in range(12)
    ]
    outs = llm.generate(["Hello"] * 12, params, use_tqdm=False)
    assert _compiled(llm) == before + 1
    assert {json.loads(out.outputs[0].text)["x"] for out in outs} <= {1, 2, 3}


def _compiled(llm: LLM) -> int:
    grammars = llm.engine.grammars
    return 0 if grammars is None else grammars.stats.grammars_compiled


def test_mixed_batch_leaves_unconstrained_rows_alone(llm: LLM) -> None:
    free = [
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, seed=11),
        SamplingParams(temperature=1.0, max_tokens=24, seed=5, logprobs=2),
    ]
    alone = llm.generate(PROMPTS[:3], free, use_tqdm=False)
    spec, valid = CASES["regex"]
    constrained = SamplingParams(temperature=0, max_tokens=40, structured_outputs=spec)
    mixed = llm.generate(
        [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2]],
        [free[0], constrained, free[1], constrained, free[2]],
        use_tqdm=False,
    )
    for ref, out in zip(alone, [mixed[0], mixed[2], mixed[4]], strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert mixed[4].outputs[0].logprobs is not None
    for out in (mixed[1], mixed[3]):
        assert out.outputs[0].finish_reason == "stop" and valid(out.outputs[0].text)


def test_greedy_tokens_equal_transformers_with_the_same_mask(
    llm: LLM, hf_model: torch.nn.Module
) -> None:
    """Reference: transformers' logits, xgrammar's own matcher and CPU mask, argmax."""
    import xgrammar as xgr

    tokenizer = llm.get_tokenizer()
    vocab = llm.config.hf_config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab, stop_token_ids=llm.config.eos_token_ids
    )
    compiler = xgr.GrammarCompiler(info)
    for prompt, compiled in [
        (PROMPTS[0], compiler.compile_regex(REGEX)),
        (PROMPTS[1], compiler.compile_grammar(GRAMMAR)),
        (PROMPTS[2], compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)),
    ]:
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        ids = tokenizer.encode(prompt)
        expected: list[int] = []
        while not matcher.is_terminated() and len(expected) < 64:
            with torch.no_grad():
                logits = hf_model(torch.tensor([ids + expected])).logits[:, -1].float()
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            token = int(logits.argmax())
            assert matcher.accept_token(token)
            expected.append(token)
        spec = {
            PROMPTS[0]: StructuredOutputsParams(regex=REGEX),
            PROMPTS[1]: StructuredOutputsParams(grammar=GRAMMAR),
            PROMPTS[2]: StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
        }[prompt]
        params = SamplingParams(temperature=0, max_tokens=64, structured_outputs=spec)
        (out,) = llm.generate(prompt, params, use_tqdm=False)
        assert out.outputs[0].token_ids == expected


def test_stop_strings_logprobs_and_chat(llm: LLM) -> None:
    spec = StructuredOutputsParams(grammar='root ::= "ab" "c"* "d"')
    # a stop string ends the output early (the grammar is not complete then)
    stop = SamplingParams(temperature=0, max_tokens=32, stop=["b"], structured_outputs=spec)
    (out,) = llm.generate("Hello", stop, use_tqdm=False)
    assert (out.outputs[0].text, out.outputs[0].finish_reason) == ("a", "stop")
    assert out.outputs[0].stop_reason == "b"
    # logprobs come from the masked distribution: the last token (EOS, the only one allowed
    # once the choice is complete) has probability 1
    choice = StructuredOutputsParams(choice=["yes", "no"])
    params = SamplingParams(
        temperature=1.0, seed=3, max_tokens=8, logprobs=2, structured_outputs=choice
    )
    (out,) = llm.generate("Hello", params, use_tqdm=False)
    completion = out.outputs[0]
    assert completion.text in ("yes", "no") and completion.finish_reason == "stop"
    chosen = [next(iter(entry.items())) for entry in completion.logprobs]
    assert [t for t, _ in chosen] == completion.token_ids
    assert chosen[-1][1].logprob == pytest.approx(0.0, abs=1e-5)
    assert completion.cumulative_logprob == pytest.approx(sum(lp.logprob for _, lp in chosen))
    # chat goes through generate: the constraint holds on the reply
    conversation = [{"role": "user", "content": "Answer yes or no."}]
    sampling = SamplingParams(temperature=0, max_tokens=8, structured_outputs=choice)
    (reply,) = llm.chat(conversation, sampling, use_tqdm=False)
    assert reply.outputs[0].text in ("yes", "no")


def test_generate_iter_left_early_then_more_work(llm: LLM) -> None:
    spec, valid = CASES["grammar"]
    params = SamplingParams(temperature=0.7, max_tokens=64, structured_outputs=spec)
    iterator = llm.generate_iter(iter(PROMPTS * 4), params, use_tqdm=False)
    first = next(iterator)
    iterator.close()  # the other constrained requests are aborted mid-grammar
    assert valid(first.outputs[0].text)
    assert llm.engine.is_finished()
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert all(valid(out.outputs[0].text) for out in outs)


def test_ignore_eos_still_ends_with_the_grammar(llm: LLM) -> None:
    spec = StructuredOutputsParams(choice=["yes", "no"])
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, structured_outputs=spec)
    (out,) = llm.generate("Hello", params, use_tqdm=False)
    assert out.outputs[0].text in ("yes", "no")
    assert out.outputs[0].finish_reason == "stop"


def test_preemption_mid_grammar_keeps_matchers_right(tiny_model_dir: str, llm: LLM) -> None:
    spec, valid = CASES["grammar"]
    params = SamplingParams(temperature=0, max_tokens=48, structured_outputs=spec)
    regex = SamplingParams(temperature=0, max_tokens=48, structured_outputs=CASES["regex"][0])
    # 31-token prompts: two 16-token blocks each, all four admitted into 8 blocks; the second
    # decode step of each needs a third block, so the newest sequences are preempted mid-grammar
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(p * 8)[:31] for p in PROMPTS[:4]]
    all_params = [params, regex, params, regex]
    expected = llm.generate(prompts, all_params, use_tqdm=False)
    with LLM(tiny_model_dir, max_model_len=96, num_kvcache_blocks=8) as small:
        outs = small.generate(prompts, all_params, use_tqdm=False)
        assert small.engine.scheduler.num_preemptions > 0
    for ref, out in zip(expected, outs, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.outputs[0].finish_reason == "stop"
        assert len(out.outputs[0].token_ids) > 3
    assert all(valid(out.outputs[0].text) for out in outs[::2])


def test_bad_request_leaves_the_engine_usable(tiny_model_dir: str, llm: LLM) -> None:
    with pytest.raises(ValueError, match="invalid regex"):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-"))
    (out,) = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4
    with LLM(tiny_model_dir, max_model_len=64, skip_tokenizer_init=True) as bare:
        params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"))
        with pytest.raises(ValueError, match="prompt 0: structured_outputs need a tokenizer"):
            bare.generate([[5, 6, 7]], params, use_tqdm=False)


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores")
def test_data_parallel_replicas_run_grammars(tiny_model_dir: str, llm: LLM) -> None:
    """Each replica builds its own grammar compiler (its tokenizer from the model folder);
    greedy results equal one engine's."""
    specs = [CASES[case][0] for case in sorted(CASES)]
    params = [SamplingParams(temperature=0, max_tokens=64, structured_outputs=s) for s in specs]
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    with LLM(tiny_model_dir, max_model_len=MAX_MODEL_LEN, data_parallel_size=2) as dp:
        outs = dp.generate(PROMPTS, params, use_tqdm=False)
    for ref, out in zip(expected, outs, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.outputs[0].finish_reason == "stop"


# -- the bitmask -----------------------------------------------------------------------------


def _allowed(masks: GrammarMasks, grammars: list[Any], vocab: int) -> list[set[int]]:
    """The token ids each grammar allows next, through GrammarMasks.apply on a CPU."""

    class Row:
        def __init__(self, grammar: Any) -> None:
            self.grammar = grammar

    # [len(grammars) + 1, vocab]: one extra unconstrained row, which must stay untouched
    logits = torch.zeros(len(grammars) + 1, vocab)
    masks.apply([Row(None), *[Row(g) for g in grammars]], logits)
    assert torch.equal(logits[0], torch.zeros(vocab))
    return [set(torch.nonzero(row == 0).flatten().tolist()) for row in logits[1:]]


def test_mask_matches_the_vocabulary_and_never_allows_ids_past_the_tokenizer() -> None:
    tokenizer = train_tokenizer(512)
    vocab = 600  # the model's vocabulary is larger than the tokenizer's 512 entries
    eos = tokenizer.eos_token_id
    compiler = GrammarCompiler(tokenizer, vocab, [eos])
    masks = GrammarMasks(vocab, torch.device("cpu"))
    texts = {i: tokenizer.decode([i]) for i in range(len(tokenizer))}
    choices = ["Paris", "Rome", "pa"]
    spec = StructuredOutputsParams(choice=choices)
    grammar = compiler.sequence_grammar(spec)
    # at the start: exactly the tokens whose text begins some choice
    (allowed,) = _allowed(masks, [grammar], vocab)
    special = set(tokenizer.all_special_ids)
    expected = {
        i
        for i, t in texts.items()
        if t and i not in special and any(c.startswith(t) for c in choices)
    }
    assert allowed == expected
    # walk to the end of "Rome": EOS is allowed exactly when the grammar can end
    for token in tokenizer.encode("Rome"):
        (allowed,) = _allowed(masks, [grammar], vocab)
        assert token in allowed and eos not in allowed
        assert grammar.accept(token)
    (allowed,) = _allowed(masks, [grammar], vocab)
    assert allowed == {eos}
    assert grammar.accept(eos) and grammar.is_terminated
    # any JSON object, mid-way: nothing past the tokenizer, ever
    other = compiler.sequence_grammar(StructuredOutputsParams(json_object=True))
    for token in tokenizer.encode('{"a": [1'):
        assert other.accept(token)
    for allowed in _allowed(masks, [other, compiler.sequence_grammar(spec)], vocab):
        assert allowed and max(allowed) < len(tokenizer)
    assert compiler.stats.grammars_compiled == 2


def test_sentencepiece_vocabulary() -> None:
    """A byte-fallback (SentencePiece-style) tokenizer: masks follow the decoded text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False
    )
    tok.train_from_iterator(["the cat sat on the mat", "yes no maybe"] * 20, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    compiler = GrammarCompiler(hf, len(hf), [hf.eos_token_id])
    assert compiler.tokenizer_info.vocab_type.name == "BYTE_FALLBACK"
    masks = GrammarMasks(len(hf), torch.device("cpu"))
    grammar = compiler.sequence_grammar(StructuredOutputsParams(regex=" ?cat"))
    (allowed,) = _allowed(masks, [grammar], len(hf))

    def text(piece: str) -> str:  # a piece as the text it stands for
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        return chr(int(byte.group(1), 16)) if byte else piece.replace("\u2581", " ")

    special = set(hf.all_special_ids)
    expected = {
        i
        for i, piece in enumerate(hf.convert_ids_to_tokens(list(range(len(hf)))))
        if i not in special and any(s.startswith(text(piece)) for s in (" cat", "cat"))
    }
    assert allowed == expected
    assert {"<0x63>", "\u2581cat", "cat"} <= set(hf.convert_ids_to_tokens(sorted(allowed)))


def _random_masks(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bits for rows 4, 0 and 2 of a 5-row batch: (logits, bitmask, rows)."""
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    # [3, words] int32 of random bits
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=gen, dtype=torch.int32)
    # [5, vocab]
    logits = torch.randn(5, vocab, generator=gen)
    return logits, bitmask, torch.tensor([4, 0, 2])


@pytest.mark.parametrize("vocab", [70, 600])
def test_torch_bitmask_equals_xgrammars_cpu_kernel(vocab: int) -> None:
    import xgrammar as xgr

    logits, bitmask, rows = _random_masks(vocab)
    actual = logits.clone()
    apply_bitmask_torch(actual, bitmask, rows)
    aligned = torch.full((5, bitmask.shape[1]), -1, dtype=torch.int32)  # rows as logits' rows
    aligned[rows] = bitmask
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, aligned, indices=rows.tolist())
    assert torch.equal(actual, expected)
    assert torch.equal(actual[[1, 3]], logits[[1, 3]])  # untouched rows
    assert 0 < torch.isinf(actual).sum() < 3 * vocab


@pytest.mark.skipif(
    not (torch.cuda.is_available() or (os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON)),
    reason="needs CUDA, or TRITON_INTERPRET=1 for the interpreter",
)
@pytest.mark.parametrize("vocab", [70, 600, 5000])
def test_bitmask_kernel_equals_the_torch_form(vocab: int) -> None:
    from nanovllm.kernels.grammar_mask import apply_bitmask

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits, bitmask, rows = _random_masks(vocab)
    expected = logits.clone()
    apply_bitmask_torch(expected, bitmask, rows)
    for dtype in (torch.float32, torch.float16):
        actual = logits.to(device, dtype)
        apply_bitmask(actual, bitmask.to(device), rows.to(device))
        assert torch.equal(actual.cpu(), expected.to(dtype))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_ahead_with_grammars(tiny_model_dir: str, llm: LLM) -> None:
    """On CUDA decode steps run ahead; a batch with grammars samples each step after the
    previous tokens reached the matchers. Greedy tokens equal the CPU engine's (float32)."""
    specs = [CASES[case][0] for case in sorted(CASES)]
    greedy = [SamplingParams(temperature=0, max_tokens=64, structured_outputs=s) for s in specs]
    free = SamplingParams(temperature=0, max_tokens=40)
    prompts = PROMPTS + PROMPTS[:1]
    expected = llm.generate(prompts, [*greedy, free], use_tqdm=False)
    with LLM(tiny_model_dir, device="cuda", dtype="float32", max_model_len=MAX_MODEL_LEN) as gpu:
        outs = gpu.generate(prompts, [*greedy, free], use_tqdm=False)
        assert gpu.engine.stats.steps_ahead > 0
        sampled = [
            SamplingParams(temperature=1.0, max_tokens=64, n=3, structured_outputs=s) for s in specs
        ]
        sampled_outs = gpu.generate(PROMPTS, sampled, use_tqdm=False)
    for ref, out in zip(expected, outs, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    for case, out in zip(sorted(CASES), sampled_outs, strict=True):
        for completion in out.outputs:
            assert completion.finish_reason == "stop" and CASES[case][1](completion.text)


# -- run-batch -------------------------------------------------------------------------------


def test_run_batch_response_format(tiny_model_dir: str, tmp_path: Any) -> None:
    schema = {"name": "person", "schema": SCHEMA}
    lines = [
        {
            "custom_id": "schema",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "user", "content": "Who?"}],
                "max_completion_tokens": 64,
                "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": schema},
            },
        },
        {
            "custom_id": "object",
            "url": "/v1/completions",
            "body": {
                "prompt": "Hello",
                "max_tokens": 48,
                "temperature": 0,
                "response_format": {"type": "json_object"},
            },
        },
        {
            "custom_id": "bad",
            "url": "/v1/completions",
            "body": {"prompt": "x", "response_format": {"type": "json_schema"}},
        },
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = run_batch(
        str(src), str(dst), lambda: LLM(tiny_model_dir, max_model_len=MAX_MODEL_LEN), "tiny", False
    )
    assert (summary.done, summary.failed) == (2, 1)
    results = {r["custom_id"]: r for r in map(json.loads, dst.read_text().splitlines())}
    assert "needs 'json_schema'" in results["bad"]["error"]["message"]
    choice = results["schema"]["response"]["body"]["choices"][0]
    text = choice["message"]["content"]
    assert text.lstrip().startswith("{")
    if choice["finish_reason"] == "stop":
        check_schema(text)
    choice = results["object"]["response"]["body"]["choices"][0]
    assert choice["text"].lstrip().startswith("{")
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["text"]), dict)
    # the body's response_format becomes the request's constraint
    for body, expected in [
        (lines[0]["body"], StructuredOutputsParams(json=SCHEMA)),
        (lines[1]["body"], StructuredOutputsParams(json_object=True)),
    ]:
        params, _ = sampling_params(body, "/v1/completions", 64)
        assert params.structured_outputs.key == expected.key
    params, _ = sampling_params({"response_format": {"type": "text"}}, "/v1/completions", 64)
    assert params.structured_outputs is None
