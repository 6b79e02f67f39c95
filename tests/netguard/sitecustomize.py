"""Loaded by every Python process of a test run (``PYTHONPATH``): refuses and records any connection to an
address outside loopback, so that a run that dials out fails (``tests/conftest.py`` reads the record).
The one exception is pip, the package registry's client (the quickstart installs, the deployment test
resolves wheels): the registry is the only network this project may reach."""

import ipaddress
import os
import socket
import sys

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _outside(address: object) -> bool:
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return False  # a Unix socket, or a form this check does not know
    try:
        return not ipaddress.ip_address(address[0].split("%")[0]).is_loopback
    except ValueError:
        return address[0] != "localhost"  # any other name may resolve anywhere


PIP_ENTRY_POINTS = ("pip/__main__.py", "pip/__pip-runner__.py", "/bin/pip")  # python -m pip, its build env, pip


def _is_pip() -> bool:
    return bool(sys.argv) and sys.argv[0].replace("\\", "/").endswith(PIP_ENTRY_POINTS)


def _refuse(address: tuple) -> None:
    with open(os.environ["NETGUARD_LOG"], "a") as record:
        record.write(f"{os.getpid()} {address[0]}:{address[1]}\n")
    raise OSError(101, f"test network guard: {address[0]} is not a loopback address")


def connect(self: socket.socket, address: object) -> None:
    if _outside(address) and not _is_pip():
        _refuse(address)  # type: ignore[arg-type]
    return _connect(self, address)


def connect_ex(self: socket.socket, address: object) -> int:
    if _outside(address) and not _is_pip():
        _refuse(address)  # type: ignore[arg-type]
    return _connect_ex(self, address)


if os.environ.get("NETGUARD_LOG"):
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
