"""The transport clients against a real redis-server and against FakeCPA (CPA's exact quirks)."""

from __future__ import annotations

import json

import pytest

from datasource.fakecpa import FakeCPA
from datasource.sources import (AuthError, HttpManagement, RespConnection, RespSubscriber, SourceError,
                                Unsupported, parse_endpoint)
from redis_server import RedisServer, free_port

KEY = "mgmt-secret"


@pytest.fixture
def server():
    with RedisServer(KEY) as srv:
        yield srv


@pytest.fixture
def cpa():
    fake = FakeCPA(KEY, retention_s=60, auth_files=[{"auth_index": "9f2c4e1a7b3d5c60", "name": "alice.json"}])
    fake.start()
    yield fake
    fake.stop()


def test_parse_endpoint_defaults_ports_and_tls():
    assert parse_endpoint("http://127.0.0.1:8317") == parse_endpoint("127.0.0.1:8317")
    assert (parse_endpoint("http://cpa.local").port, parse_endpoint("http://cpa.local").tls) == (80, False)
    ep = parse_endpoint("https://cpa.example.com")
    assert (ep.host, ep.port, ep.tls) == ("cpa.example.com", 443, True)


def test_batch_pops_on_real_redis(server):
    for i in range(7):
        server.enqueue(f"{{\"n\":{i}}}")
    conn = RespConnection(server.url, KEY).open()
    try:
        assert conn.pop(3, "left") == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
        assert conn.pop(3, "right") == [b'{"n":6}', b'{"n":5}', b'{"n":4}']
        assert conn.pop(3, "left") == [b'{"n":3}']
        assert conn.pop(3, "left") == []
    finally:
        conn.close()


def test_wrong_password_is_an_auth_error_not_a_network_error(server):
    with pytest.raises(AuthError) as info:
        RespConnection(server.url, "wrong").open()
    assert info.value.stage == "auth"
    assert str(info.value).startswith("wrong key or IP banned")


def test_refused_connection_is_a_connect_error():
    with pytest.raises(SourceError) as info:
        RespConnection(f"http://127.0.0.1:{free_port()}", KEY, timeout_s=2).open()
    assert info.value.stage == "connect"
    assert not isinstance(info.value, AuthError)


def test_subscriber_receives_pushes_and_answers_ping(server):
    sub = RespSubscriber(server.url, KEY).open()
    try:
        assert server.enqueue(b'{"a":1}') is True  # a subscriber is attached: pushed, not queued
        assert server.client().llen("usage") == 0
        sub.ping()
        messages = sub.read(2.0, 10)
        assert [m.payload for m in messages] == [b'{"a":1}']
        assert sub.read(0.3, 10) == [] and sub.pongs == 1
    finally:
        sub.close()


def test_broken_connection_mid_subscription_raises_connect_error(server):
    sub = RespSubscriber(server.url, KEY).open()
    server.stop()
    with pytest.raises(SourceError) as info:
        sub.read(1.0, 10)
    assert info.value.stage == "connect"
    sub.close()


def test_fakecpa_resp_pop_and_subscribe_speak_cpa_protocol(cpa):
    for i in range(3):
        cpa.publish(f"{{\"n\":{i}}}")
    conn = RespConnection(cpa.url, KEY).open()
    try:  # CPA pops the oldest items first on either side
        assert conn.pop(2, "right") == [b'{"n":0}', b'{"n":1}']
    finally:
        conn.close()
    sub = RespSubscriber(cpa.url, KEY).open()
    try:
        messages = sub.read(2.0, 10)
        assert [m.payload for m in messages] == [b'{"support_refresh":true}']
        sub.ping()
        assert sub.read(1.0, 10) == [] and sub.pongs == 1
        assert cpa.publish('{"n":9}') == "published"
        assert [m.payload for m in sub.read(2.0, 10)] == [b'{"n":9}']
    finally:
        sub.close()


def test_fakecpa_wrong_key_costs_exactly_one_failed_login(cpa):
    with pytest.raises(AuthError):
        RespConnection(cpa.url, "wrong").open()
    assert cpa.bans.failures_total == 1


def test_http_usage_queue_unwraps_invalid_items_sent_as_json_strings(cpa):
    cpa.publish('{"n":1}')
    cpa.publish("not json")
    cpa.publish('{"n":2}')
    client = HttpManagement(cpa.url, KEY)
    assert client.usage_queue(10) == [b'{"n":1}', b"not json", b'{"n":2}']
    assert client.usage_queue(10) == []


def test_http_bad_count_is_a_400_with_cpas_message(cpa):
    with pytest.raises(SourceError) as info:
        HttpManagement(cpa.url, KEY).usage_queue(0)
    assert info.value.stage == "http"
    assert str(info.value) == "GET /v0/management/usage-queue?count=0: HTTP 400 count must be a positive integer"


def test_http_wrong_key_is_auth_error_and_missing_route_is_unsupported(cpa):
    with pytest.raises(AuthError, match="invalid management key"):
        HttpManagement(cpa.url, "wrong").usage_queue(1)
    disabled = FakeCPA("")  # no management secret: CPA answers 404
    disabled.start()
    try:
        with pytest.raises(Unsupported):
            HttpManagement(disabled.url, KEY).usage_queue(1)
    finally:
        disabled.stop()


def test_http_config_and_auth_files(cpa):
    client = HttpManagement(cpa.url, KEY)
    config = client.config()
    assert config["usage-statistics-enabled"] is True
    assert config["redis-usage-queue-retention-seconds"] == 60
    assert client.auth_files() == [{"auth_index": "9f2c4e1a7b3d5c60", "name": "alice.json"}]
    assert client.usage_statistics_enabled() is True
