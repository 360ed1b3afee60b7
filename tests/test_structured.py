"""Structured outputs (decoding/structured.py): a grammar's token mask on every verified row, so
constrained strict decoding is token for token constrained autoregressive decoding, alone and
batched, and the answer is valid JSON."""

from __future__ import annotations

import json

import pytest
import torch

from decoding.config import SamplingParams
from decoding.drafters import PromptLookupDrafter
from decoding.engine import Sequence, encode_prompt, generate
from decoding.errors import InvalidRequestError
from decoding.methods import Datastores, make_drafter
from decoding.scheduler import BatchScheduler
from decoding.structured import Grammar, GrammarConstraint, _mask_rows
from decoding.tree import TokenTree
from index.dense_store import DenseStore

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                                           "pets": {"type": "array", "items": {"type": "string", "maxLength": 24},
                                                    "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
CALL = {"type": "object", "properties": {"name": {"const": "multiply"}, "arguments": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
    "additionalProperties": False}}, "required": ["name", "arguments"], "additionalProperties": False}
CAT = "Give me a JSON object describing a cat with fields name, color and age."
PERSON = "Invent a person with a name, an age and up to three pets. Answer in JSON."


def test_the_tokens_a_grammar_forces_are_drafted_and_land(target_bf16):
    """A tool call's name and the keys between its values are forced by its schema: they are the
    draft of the steps they follow, every one accepted, so the call takes a few steps (`ar`, no
    drafter, decodes them one a step); the answer is the same, without an EOS after its end."""
    ids = encode_prompt(target_bf16, "What is 12 times 34? Call the function multiply.")
    params = SamplingParams(max_new_tokens=40)
    ar = generate(target_bf16, ids, params=params, grammar=Grammar.json_schema(CALL))
    pld = generate(target_bf16, ids, params=params, drafter=PromptLookupDrafter(), budget=4,
                   grammar=Grammar.json_schema(CALL))
    value = json.loads(ar.text)
    assert value["name"] == "multiply" and set(value["arguments"]) == {"a", "b"}
    assert pld.token_ids == ar.token_ids and ar.token_ids[-1] not in target_bf16.eos_token_ids
    assert ar.stats.steps == len(ar.token_ids) - 1 and pld.stats.steps <= ar.stats.steps // 2
    c = GrammarConstraint(Grammar.json_schema(CALL), target_bf16)
    forced = c.forced()
    assert target_bf16.tokenizer.decode(forced).startswith('{"name": "multiply", "arguments": {"')
    assert c.forced(3) == forced[:3] and c.forced(-1) == []


def test_bad_grammars_are_one_line_errors(target_bf16):
    with pytest.raises(InvalidRequestError, match="JSON schema"):
        Grammar.json_schema({"type": "bogus"})
    with pytest.raises(InvalidRequestError, match="must be an object"):
        Grammar.json_schema(["not", "a", "schema"])
    with pytest.raises(InvalidRequestError, match="ignore_eos"):
        Sequence(target_bf16, [1, 2, 3], params=SamplingParams(ignore_eos=True), grammar=Grammar.json_object())


def test_each_tree_row_gets_the_mask_of_its_position_alone(target_bf16):
    tok = target_bf16.tokenizer
    grammar = Grammar.json_schema(SCHEMA)
    answer = tok.encode('{"name": "Ann", "age": ', add_special_tokens=False)
    digits = [tok.encode(d, add_special_tokens=False)[0] for d in ("4", "2", "7")]
    comma, letter = tok.encode(",", add_special_tokens=False)[0], tok.encode("x", add_special_tokens=False)[0]
    # root (the answer's last token, pending) -> 4 -> 2 -> ","; root -> 7; root -> "x" (not JSON: forbidden) -> 4
    tree = TokenTree((answer[-1], digits[0], digits[1], comma, digits[2], letter, digits[0]),
                     (-1, 0, 1, 2, 0, 0, 5))
    logits = torch.randn(len(tree), target_bf16.vocab_size)
    raw = logits.clone()
    c = GrammarConstraint(grammar, target_bf16)
    c.add(answer)
    c.apply(logits, tree)
    for i, path in enumerate([[], [0], [0, 1], [0, 1, 2], [3]]):
        alone = GrammarConstraint(grammar, target_bf16)
        alone.add(answer + [tree.tokens[1 + j] for j in path])
        want = alone.apply(raw[i:i + 1].clone())
        assert torch.equal(logits[i], want[0]), f"node {i}"
    assert logits[0, letter] == float("-inf") and torch.isfinite(logits[0, digits[0]])
    assert torch.equal(logits[5:], raw[5:])         # the forbidden child's subtree: unreachable, untouched
    assert torch.isinf(logits[3]).sum() > target_bf16.vocab_size - 1000     # after "42,": a key's quote


@pytest.mark.parametrize("vocab,width", [(49152, 49152), (49157, 49160), (100, 128)])
def test_the_word_by_word_mask_equals_a_bit_by_bit_one(vocab, width):
    """_mask_rows (skips words of 32 allowed tokens, keeps the few allowed of mostly closed rows)
    against the plain mask: every bit unpacked, rows a grammar allows mostly, rarely, or at random."""
    import numpy as np

    words = (vocab + 31) // 32
    bits = np.random.default_rng(0).integers(-2**31, 2**31, size=(7, words), dtype=np.int64).astype(np.int32)
    bits[0, : words // 2] = -1
    bits[1] = 0
    bits[2, 3] = -1
    bits[3, ::2] = 0
    bits[4] = 0
    bits[4, 1] = 5
    bits[5] = -1
    logits = torch.randn(7, width)
    want = logits.clone()
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    forbid = torch.nn.functional.pad(torch.from_numpy(allowed == 0), (0, width - vocab), value=True)
    rows = [0, 1, 3, 4, 5, 6]
    want[rows] = want[rows].masked_fill(forbid[rows], float("-inf"))
    _mask_rows(logits.numpy(), rows, bits, vocab)
    assert torch.equal(logits, want)


@pytest.fixture(scope="module")
def stores(dense_store_dir):
    return Datastores(dense=DenseStore.load(dense_store_dir))


def test_constrained_strict_decoding_equals_constrained_autoregressive(target_bf16, stores):
    """PLD and SENSE under a JSON-object grammar and a JSON schema, alone and in one batch with a
    plain request: token for token the constrained autoregressive answers, which are valid JSON
    (the schema's keys and types) and differ from the unconstrained answers."""
    cases = [(CAT, Grammar.json_object()), (PERSON, Grammar.json_schema(SCHEMA))]
    params = SamplingParams(max_new_tokens=80)
    refs, accepted = [], 0
    for question, grammar in cases:
        ids = encode_prompt(target_bf16, question)
        ref = generate(target_bf16, ids, params=params, grammar=grammar, logprobs=1)
        assert ref.finish_reason == "stop", ref.text
        value = json.loads(ref.text)
        assert isinstance(value, dict)
        refs.append(ref)
        for make in (lambda: PromptLookupDrafter(max_candidates=4), lambda: make_drafter("sense", stores)):
            out = generate(target_bf16, ids, params=params, drafter=make(), budget=8, grammar=grammar, logprobs=1)
            assert out.token_ids == ref.token_ids and out.logprobs == ref.logprobs
            accepted += out.stats.accepted
    assert accepted > 0
    person = json.loads(refs[1].text)
    assert set(person) == {"name", "age", "pets"} and isinstance(person["age"], int) and len(person["pets"]) <= 3
    plain_ids = encode_prompt(target_bf16, PERSON)
    plain = generate(target_bf16, plain_ids, params=params)
    assert plain.token_ids != refs[1].token_ids
    scheduler = BatchScheduler(target_bf16, max_batch=4)
    seqs = [Sequence(target_bf16, encode_prompt(target_bf16, q), params=params, drafter=make_drafter("sense", stores),
                     budget=6, grammar=g) for q, g in cases]
    seqs.append(Sequence(target_bf16, plain_ids, params=params, drafter=PromptLookupDrafter(), budget=6))
    for s in seqs:
        scheduler.add(s)
    scheduler.run()
    assert [s.result().token_ids for s in seqs] == [r.token_ids for r in refs] + [plain.token_ids]
