"""The session Protocol is what the runner and the app may use; the real session and the test fake both
implement every member of it, with the same parameters, so the fake cannot drift from the real thing."""

from __future__ import annotations

import inspect

import pytest
from fake_session import FakeSession

from tracer.protocol import Session
from tracer.session import TraceSession


def protocol_members() -> dict[str, object]:
    members = {name: getattr(Session, name) for name in dir(Session)
               if not name.startswith("_") and name in vars(Session)}
    members.update({name: None for name in Session.__annotations__})
    return members


def parameters(function) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("implementation", [TraceSession, FakeSession])
def test_every_protocol_member_is_implemented_with_the_same_parameters(implementation, tiny_llama_dir):
    from tracer.loading import load_model

    instance = TraceSession(load_model(str(tiny_llama_dir))) if implementation is TraceSession else FakeSession()
    for name, declared in protocol_members().items():
        assert hasattr(instance, name), f"{implementation.__name__} lacks {name}"
        if inspect.isfunction(declared):
            assert parameters(getattr(implementation, name)) == parameters(declared), name
