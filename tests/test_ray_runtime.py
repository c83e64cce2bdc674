"""study.ray_runtime without starting Ray: the loopback node address of a local Ray (issue 12, cases 10-11)."""

from __future__ import annotations

import socket

import pytest

from study import ray_runtime


@pytest.fixture(autouse=True)
def _fresh_address_cache():
    ray_runtime.loopback_node_address.cache_clear()
    yield
    ray_runtime.loopback_node_address.cache_clear()


def test_local_ray_node_address_is_loopback_but_not_the_rewritten_127_0_0_1():
    # Ray rewrites "127.0.0.1" (and "localhost") to the host's public address in every process that connects
    # by address, where a loopback-only Ray does not listen; another address of 127.0.0.0/8 is kept.
    from ray._common.network_utils import is_localhost

    address = ray_runtime.loopback_node_address()
    assert address == ray_runtime.LOOPBACK_NODE == "127.0.0.2"  # Linux routes all of 127.0.0.0/8 to lo
    assert not is_localhost(address)
    assert ray_runtime._is_loopback_address(f"{address}:6379")


def test_a_machine_without_127_0_0_2_falls_back_to_127_0_0_1(monkeypatch):
    real_bind = socket.socket.bind

    def bind(sock, addr):
        if addr[0] == ray_runtime.LOOPBACK_NODE:
            raise OSError(49, "Can't assign requested address")  # what macOS says
        return real_bind(sock, addr)

    monkeypatch.setattr(socket.socket, "bind", bind)
    assert ray_runtime.loopback_node_address() == "127.0.0.1"
