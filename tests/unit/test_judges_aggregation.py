"""Aggregation of a judge's answer distribution into a 0-100 score (pure functions)."""

import math

import pytest

from persona.judges.aggregation import (
    aggregate,
    aggregate_0_10,
    aggregate_0_100,
    aggregate_binary,
    is_refusal,
    logprobs_to_probs,
    parse_score,
    refusal_mass,
    splits_numbers,
)


def test_0_100_is_the_probability_weighted_mean_over_integers():
    probs = {"80": 0.5, "90": 0.25, "70": 0.125, "The": 0.125}
    expected = (80 * 0.5 + 90 * 0.25 + 70 * 0.125) / 0.875
    assert aggregate_0_100(probs) == pytest.approx(expected)


def test_0_100_ignores_numbers_out_of_range_and_non_numbers():
    probs = {"50": 0.5, "150": 0.3, "-5": 0.1, "5.5": 0.05, "²": 0.05}
    assert aggregate_0_100(probs) == pytest.approx(50.0)


def test_0_100_is_none_below_a_quarter_of_the_mass():
    assert aggregate_0_100({"50": 0.24, "The": 0.76}) is None
    assert aggregate_0_100({"50": 0.25, "The": 0.75}) == pytest.approx(50.0)


def test_whitespace_is_stripped_and_colliding_tokens_add_up():
    # The seed's dict let " 8" overwrite "8"; both are the answer 8.
    assert aggregate_0_100({" 8": 0.2, "8": 0.2, "100 ": 0.2}) == pytest.approx((8 * 0.4 + 100 * 0.2) / 0.6)
    assert logprobs_to_probs([(" 8", math.log(0.2)), ("8", math.log(0.3))]) == pytest.approx({"8": 0.5})


def test_0_10_is_scaled_to_0_100():
    assert aggregate_0_10({"7": 0.5, "9": 0.5}) == pytest.approx(80.0)
    assert aggregate_0_10({"10": 1.0}) == pytest.approx(100.0)
    assert aggregate_0_10({"11": 0.9, "5": 0.1}) is None  # 11 is off the scale


def test_binary_is_the_share_of_yes():
    assert aggregate_binary({"Yes": 0.6, " no": 0.2, "maybe": 0.2}) == pytest.approx(75.0)
    assert aggregate_binary({"YES": 0.1, "The": 0.9}) is None
    assert aggregate({"yes": 1.0}, "binary") == pytest.approx(100.0)


def test_unknown_aggregation_names_the_fix():
    with pytest.raises(ValueError, match="0_100"):
        aggregate({"5": 1.0}, "0-100")


def test_refusal_dominates_only_with_more_mass_than_the_numbers():
    assert refusal_mass({"REF": 0.5, " REFUSAL": 0.2, "R": 0.1, "Refer": 0.1}) == pytest.approx(0.7)
    assert is_refusal({"REF": 0.6, "0": 0.3})
    assert not is_refusal({"REF": 0.3, "0": 0.6})
    assert not is_refusal({"0": 1.0})


def test_split_numbers_are_detected_from_single_digit_top_tokens():
    # A digit-splitting tokenizer shows "85" as "8": no whole number above 9 among the top tokens.
    assert splits_numbers({"8": 0.7, "9": 0.2, "7": 0.05})
    # A whole-number tokenizer's confident "0" still lists a few larger numbers behind it.
    assert not splits_numbers({"0": 0.99, "10": 1e-4, "5": 1e-3})
    assert not splits_numbers({"8": 0.7}, "0_10")  # only 0-100 expects multi-digit answers
    assert not splits_numbers({"REF": 0.9, "8": 0.05})  # too little numeric mass to matter


@pytest.mark.parametrize(
    ("text", "aggregation", "expected"),
    [
        ("85", "0_100", (85.0, False)),
        (" 100\n", "0_100", (100.0, False)),
        ("101", "0_100", (None, False)),
        ("REFUSAL", "0_100", (None, True)),
        ("The answer", "0_100", (None, False)),
        ("7.", "0_10", (70.0, False)),
        ("Yes.", "binary", (100.0, False)),
        ("no", "binary", (0.0, False)),
    ],
)
def test_parse_score(text, aggregation, expected):
    assert parse_score(text, aggregation) == expected


def test_min_mass_zero_scores_given_a_numeric_answer():
    from persona.judges.aggregation import aggregate

    probs = {"10": 0.05, "90": 0.05, "The": 0.9}
    assert aggregate(probs) is None  # the seed's floor: under 0.25 on numbers
    assert aggregate(probs, min_mass=0.0) == pytest.approx(50.0)
    assert aggregate({"The": 1.0}, min_mass=0.0) is None


def test_a_parsed_decimal_is_read_whole():
    from persona.judges.aggregation import parse_score

    assert parse_score("0.5") == (0.5, False) and parse_score(" 85 because") == (85.0, False)
    assert parse_score("101") == (None, False) and parse_score("REFUSAL") == (None, True)


def test_an_empty_score_says_why_in_words():
    from persona.generation.predict_loop import missing_reason

    assert missing_reason("logprobs") == "the judge gave no number"
    assert missing_reason("failed") == "failed" and missing_reason(None) == "not judged"
