"""The CORS policy: which origins a browser page may call from, and the headers that say so."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_jax.cors import CorsPolicy, parse_origins

ports = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
local_hosts = st.sampled_from(["localhost", "127.0.0.1", "[::1]", "LOCALHOST"])
other_hosts = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True
                            ).filter(lambda h: h != "localhost")


@given(scheme=st.sampled_from(["http", "https"]), host=local_hosts, port=ports)
def test_local_pages_are_allowed_by_default(scheme, host, port):
    origin = f"{scheme}://{host}{port}"
    policy = CorsPolicy()
    assert policy.allows(origin)
    assert policy.response_headers(origin) == [
        ("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
        ("Access-Control-Expose-Headers", "X-Request-Id")]  # the page's script may read it


@given(scheme=st.sampled_from(["http", "https"]), host=other_hosts, port=ports)
def test_other_origins_are_not_allowed_by_default(scheme, host, port):
    origin = f"{scheme}://{host}{port}"
    assert not CorsPolicy().allows(origin)
    assert CorsPolicy().response_headers(origin) == []
    assert CorsPolicy().preflight_headers(origin, "content-type") is None
    # Look-alikes of a local origin are other origins.
    for fake in (f"http://localhost.{host}", f"http://{host}/localhost", "http://127.0.0.1.nip.io",
                 "null", "file://"):
        assert not CorsPolicy().allows(fake)


@given(scheme=st.sampled_from(["http", "https"]), host=other_hosts, port=ports)
def test_listed_origins_and_star(scheme, host, port):
    origin = f"{scheme}://{host}{port}"
    listed = parse_origins(f"local, {origin}/")  # a trailing slash is tolerated
    assert listed.allows(origin) and listed.allows("http://127.0.0.1:8080")
    assert not listed.allows(origin + "0" if port else origin + ":1")
    star = parse_origins("*")
    assert star.response_headers(origin) == [("Access-Control-Allow-Origin", "*"),
                                             ("Access-Control-Expose-Headers", "X-Request-Id")]


def test_parse_origins_takes_ip_and_ipv6_origins():
    policy = parse_origins("http://192.168.1.5:3000,http://[fe80::1]:8080,null")
    assert all(policy.allows(o) for o in ("http://192.168.1.5:3000", "http://[fe80::1]:8080",
                                          "null"))
    assert not policy.allows("http://localhost:3000")


def test_preflight_headers():
    extra = dict(CorsPolicy().preflight_headers("http://localhost:5173",
                                                "Authorization, X-Stainless-Os"))
    assert extra["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    assert extra["Access-Control-Allow-Headers"] == "Authorization, X-Stainless-Os"
    assert int(extra["Access-Control-Max-Age"]) > 0
    # Only a list of header names is echoed back.
    bad = dict(CorsPolicy().preflight_headers("http://localhost", "x-a: 1\r\nSet-Cookie: a=b"))
    assert "Access-Control-Allow-Headers" not in bad


@pytest.mark.parametrize("text", ["", " , ", "example.com", "ftp://x", "http://a/b", "http://a:1:2",
                                  "http://[::1", "http://a b"])
def test_parse_origins_rejects_what_is_not_an_origin(text):
    with pytest.raises(ValueError, match="--allowed-origins"):
        parse_origins(text)
