"""A model's generation_config.json gives the defaults of the sampling fields a request omits, as
vLLM's `--generation-config auto` does: parsed and checked (generation_config.py), applied by
request validation (protocol.py) and by the server (`serve --generation-config auto|off`)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_jax.generation_config import (
    SAMPLING_KEYS,
    GenerationConfigError,
    load_generation_defaults,
)
from qwen_jax.protocol import validate_chat_request
from qwen_jax.sampler import SamplingParams

# Qwen2.5-7B-Instruct's generation_config.json, as released.
QWEN25_INSTRUCT = {
    "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
    "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
    "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0",
}
MODEL = "m"
MESSAGES = [{"role": "user", "content": "hi"}]


def write(tmp_path, data) -> None:
    (tmp_path / "generation_config.json").write_text(
        data if isinstance(data, str) else json.dumps(data))


def test_qwen25_instructs_file_gives_its_sampling_values_and_nothing_else(tmp_path):
    write(tmp_path, QWEN25_INSTRUCT)
    assert load_generation_defaults(tmp_path) == {
        "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def test_no_file_null_values_and_max_new_tokens(tmp_path):
    assert load_generation_defaults(tmp_path) == {}
    write(tmp_path, {"eos_token_id": 2, "temperature": None, "min_p": 0.05, "top_k": 40.0,
                     "max_new_tokens": 300, "do_sample": False})
    # do_sample is not read (as vLLM); a JSON 40.0 is the integer 40; max_new_tokens is max_tokens
    got = load_generation_defaults(tmp_path)
    assert got == {"min_p": 0.05, "top_k": 40, "max_tokens": 300}
    assert isinstance(got["top_k"], int)


@pytest.mark.parametrize("content, named", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": "20"}, "top_k"),
    ({"repetition_penalty": True}, "repetition_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ("[1, 2]", "JSON object"),
    ("{not json", "cannot read"),
])
def test_a_value_the_server_cannot_use_is_an_error_naming_the_file_and_key(
        tmp_path, content, named):
    write(tmp_path, content)
    with pytest.raises(GenerationConfigError) as e:
        load_generation_defaults(tmp_path)
    assert named in str(e.value) and "generation_config.json" in str(e.value)


SAMPLING_VALUES = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 100),
    "min_p": st.floats(0, 1), "repetition_penalty": st.floats(0.5, 2),
}


@settings(max_examples=60, deadline=None)
@given(defaults=st.fixed_dictionaries({}, optional=SAMPLING_VALUES),
       sent=st.fixed_dictionaries(
           {}, optional={**SAMPLING_VALUES, "max_tokens": st.integers(1, 9)}),
       nulls=st.sets(st.sampled_from(SAMPLING_KEYS)),
       default_max=st.none() | st.integers(1, 99))
def test_a_request_takes_its_own_values_and_the_defaults_for_what_it_omits(
        defaults, sent, nulls, default_max):
    """Field by field: the request's value when it sends one, else the default when there is
    one, else the API's (SamplingParams'); null is omitted; max_tokens likewise."""
    body = {"model": MODEL, "messages": MESSAGES, **sent,
            **{k: None for k in nulls if k not in sent}}
    given_defaults = dict(defaults) | ({} if default_max is None else {"max_tokens": default_max})
    req = validate_chat_request(body, served_model_name=MODEL, defaults=given_defaults)
    api = SamplingParams()
    for k in SAMPLING_KEYS:
        expected = sent[k] if k in sent else defaults.get(k, getattr(api, k))
        assert getattr(req.sampling, k) == expected, k
    assert req.max_tokens == sent.get("max_tokens", default_max)
    assert not req.ignored_fields
    # Without defaults, omitted fields are the API's.
    plain = validate_chat_request(body, served_model_name=MODEL)
    assert all(getattr(plain.sampling, k) == sent.get(k, getattr(api, k)) for k in SAMPLING_KEYS)


def test_max_completion_tokens_wins_over_the_default_max_tokens():
    body = {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 5}
    assert validate_chat_request(body, served_model_name=MODEL,
                                 defaults={"max_tokens": 50}).max_tokens == 5
