"""Sampling-parameter validation: ranges, types, logit_bias, and the table against the API doc."""

from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_jax.sampler import (
    MAX_LOGIT_BIAS,
    SAMPLING_RANGES,
    SamplingParamError,
    SamplingParams,
    seed_key,
    validate_sampling_params,
)

SCALARS = [name for name in SAMPLING_RANGES if name != "logit_bias"]
INTEGERS = {"top_k", "seed"}


def _call(name: str, value):
    """Validate one field the way the API layer does (logit_bias values on token 5)."""
    if name == "logit_bias":
        return validate_sampling_params({"logit_bias": {"5": value}})
    return validate_sampling_params({name: value})


def _inside(name: str, value: float) -> bool:
    lo, hi, lo_inc, hi_inc = SAMPLING_RANGES[name]
    return (lo < value or (lo_inc and value == lo)) and (value < hi or (hi_inc and value == hi))


def _rejects(name: str, value, fragment: str | None = None) -> SamplingParamError:
    with pytest.raises(SamplingParamError) as info:
        _call(name, value)
    assert info.value.param == name
    assert name in str(info.value)
    if fragment is not None:
        assert fragment in str(info.value)
    return info.value


def _outside_values(name: str) -> list:
    lo, hi, _, _ = SAMPLING_RANGES[name]
    if name in INTEGERS:
        return [lo - 1, hi + 1]
    return [float(np.nextafter(lo, -np.inf)), float(np.nextafter(hi, np.inf))]


@pytest.mark.parametrize("name", list(SAMPLING_RANGES))
def test_bounds_inside_accepted_outside_rejected(name):
    lo, hi, lo_inc, hi_inc = SAMPLING_RANGES[name]
    for bound, inclusive in ((lo, lo_inc), (hi, hi_inc)):
        if inclusive:
            params = _call(name, bound)
            got = params.logit_bias[0][1] if name == "logit_bias" else getattr(params, name)
            assert got == (0 if (name, bound) == ("top_k", -1) else bound)  # -1: off, as vLLM
        else:
            _rejects(name, bound)
    # Just inside an exclusive bound is accepted.
    if not lo_inc:
        _call(name, lo + 1 if name in INTEGERS else float(np.nextafter(lo, np.inf)))
    if not hi_inc:
        _call(name, hi - 1 if name in INTEGERS else float(np.nextafter(hi, -np.inf)))
    for value in _outside_values(name):
        _rejects(name, value)


@pytest.mark.parametrize("name", [n for n in SAMPLING_RANGES if n not in INTEGERS])
@settings(max_examples=60, deadline=None)
@given(value=st.floats(-200, 200, allow_nan=False))
def test_any_float_accepted_exactly_when_in_range(name, value):
    if _inside(name, value):
        _call(name, value)
    else:
        _rejects(name, value)


@pytest.mark.parametrize("name", [n for n in SAMPLING_RANGES if n not in INTEGERS])
@settings(max_examples=40, deadline=None)
@given(value=st.one_of(st.integers(-300, 300), st.integers(-(10**400), 10**400),
                       st.sampled_from([10**309, -(10**309), 10**400])))
def test_an_integer_of_any_size_for_a_number_is_accepted_exactly_when_in_range(name, value):
    """JSON integers have no size limit: one past float range is out of range, not a crash
    (it raised OverflowError, a 500 through the API)."""
    if _inside(name, value):
        _call(name, value)
    else:
        _rejects(name, value, "must be in")


@pytest.mark.parametrize("name", sorted(INTEGERS))
@settings(max_examples=40, deadline=None)
@given(value=st.integers(-(2**64), 2**64))
def test_any_integer_accepted_exactly_when_in_range(name, value):
    if _inside(name, value):
        assert getattr(_call(name, value), name) == value
    else:
        _rejects(name, value)


@pytest.mark.parametrize("name", list(SAMPLING_RANGES))
@pytest.mark.parametrize("bad", ["1", True, False, float("nan"), float("inf"), -float("inf"),
                                 [1], {"a": 1}])
def test_wrong_types_rejected(name, bad):
    _rejects(name, bad)


@pytest.mark.parametrize("name", sorted(INTEGERS))
def test_integers_reject_floats(name):
    _rejects(name, 1.0, "integer")
    _rejects(name, 1.5, "integer")


def test_null_and_missing_fields_take_the_api_defaults():
    assert validate_sampling_params({}) == SamplingParams()
    nulls = {name: None for name in SAMPLING_RANGES}
    p = validate_sampling_params(nulls)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.logit_bias, p.seed) == ((), None)


def test_other_request_fields_are_ignored_and_values_normalised():
    body = {"model": "m", "messages": [], "stream": True, "temperature": 1, "top_k": 20,
            "seed": 7, "logit_bias": {"10": 5, "2": -1.5}}
    p = validate_sampling_params(body)
    assert isinstance(p.temperature, float) and p.temperature == 1.0
    assert p.top_k == 20 and p.seed == 7
    assert p.logit_bias == ((2, -1.5), (10, 5.0))


def test_accepts_params_objects_and_keywords():
    p = SamplingParams(temperature=0.5, top_p=0.9)
    assert validate_sampling_params(p) == p
    assert validate_sampling_params(p, top_k=5) == SamplingParams(temperature=0.5, top_p=0.9,
                                                                   top_k=5)
    with pytest.raises(TypeError):
        validate_sampling_params(temprature=0.5)  # a misspelt keyword is a programming error


def test_direct_construction_is_validated_too():
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(temperature=2.5)
    assert info.value.param == "temperature"
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(logit_bias=((3, 101.0),))
    assert info.value.param == "logit_bias"


@pytest.mark.parametrize("key", ["-1", "abc", "1.5", "01", " 1", "1 ", "", "1e3", "٣"])
def test_logit_bias_keys_must_be_token_ids(key):
    with pytest.raises(SamplingParamError) as info:
        validate_sampling_params({"logit_bias": {key: 1.0}})
    assert info.value.param == "logit_bias" and "logit_bias" in str(info.value)


def test_logit_bias_ids_checked_against_the_vocabulary():
    ok = validate_sampling_params({"logit_bias": {"151664": 1}}, vocab_limit=151665)
    assert ok.logit_bias == ((151664, 1.0),)
    with pytest.raises(SamplingParamError, match="logit_bias.*151665"):
        validate_sampling_params({"logit_bias": {"151665": 1}}, vocab_limit=151665)
    # Without a vocabulary any id >= 0 passes here; the batch builder checks against its V.
    assert validate_sampling_params({"logit_bias": {"999999": 1}}).logit_bias == ((999999, 1.0),)


def test_logit_bias_shape_and_size():
    with pytest.raises(SamplingParamError, match="twice"):
        validate_sampling_params({"logit_bias": {5: 1.0, "5": 2.0}})
    with pytest.raises(SamplingParamError, match="logit_bias"):
        validate_sampling_params({"logit_bias": [1, 2, 3]})
    with pytest.raises(SamplingParamError, match="logit_bias"):
        validate_sampling_params({"logit_bias": "5:1"})
    full = {str(i): 1.0 for i in range(MAX_LOGIT_BIAS)}
    assert len(validate_sampling_params({"logit_bias": full}).logit_bias) == MAX_LOGIT_BIAS
    with pytest.raises(SamplingParamError, match=str(MAX_LOGIT_BIAS)):
        validate_sampling_params({"logit_bias": {**full, str(MAX_LOGIT_BIAS): 1.0}})


def test_params_are_hashable_and_frozen():
    p = SamplingParams(logit_bias={"3": 1})
    assert hash(p) == hash(SamplingParams(logit_bias=((3, 1.0),)))
    with pytest.raises(AttributeError):
        p.temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 + 7,
                                  2**63 - 1])
def test_seed_key_is_jax_prngkey(seed):
    with jax.enable_x64(True):
        expected = np.asarray(jax.random.PRNGKey(seed))
    np.testing.assert_array_equal(seed_key(seed), expected)


_RANGE_LINE = re.compile(
    r"Range:\s*(?P<lo>[-\d.]+)\s*(?P<lo_op>≤|<)\s*(?P<name>\w+)\s*(?P<hi_op>≤|<)\s*(?P<hi>[-\d.]+)")


@pytest.mark.needs_shared
def test_ranges_match_the_api_document(shared_reference):
    text = (shared_reference / "deepinfra-qwen2.5-7b-instruct-api.txt").read_text()
    documented = {m["name"]: m for m in _RANGE_LINE.finditer(text)}
    checked = 0
    for name, (lo, hi, lo_inc, hi_inc) in SAMPLING_RANGES.items():
        if name not in documented:
            continue
        m = documented[name]
        # The one extension: top_k -1 is off, as in vLLM (the document starts at 0).
        assert (-1 if name == "top_k" else float(m["lo"])) == lo, name
        # The document prints 2**63 as 9223372036854776000 (a float's decimal form).
        assert math.isclose(float(m["hi"]), hi, rel_tol=1e-12), name
        assert (m["lo_op"] == "≤", m["hi_op"] == "≤") == (lo_inc, hi_inc), name
        checked += 1
    # Every documented sampling range is in the table (logit_bias is not in the document).
    assert checked == len(SAMPLING_RANGES) - 1
