"""The quality measures used by the SENSE benchmark."""

from bench.quality import gsm8k_answer, rouge_l, token_agreement


def test_gsm8k_answer():
    assert gsm8k_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert gsm8k_answer("#### 1,250") == "1250"
    assert gsm8k_answer("The answer is 12.5.") == "12.5"
    assert gsm8k_answer("The answer is 3.0") == "3"
    assert gsm8k_answer("no number") is None


def test_agreement_and_rouge():
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 2, 3], [1, 9, 3, 4]) == 0.5
    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l([1, 2, 3, 4], [1, 3, 4]) == 2 * (3 / 4 * 1) / (3 / 4 + 1)
    assert rouge_l([1], [2]) == 0.0
