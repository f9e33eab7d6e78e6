"""A crafted .pt is refused in one line that names the blocked global and says that nothing ran."""

from __future__ import annotations

import os

import pytest
import torch

from hpcgraft.errors import InputError
from hpcgraft.storage.statefile import load_state, load_states


class _Payload:
    """What a hostile file holds: unpickling it would call os.system."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("load", [load_state, load_states])
def test_a_pickled_call_is_refused_naming_the_global_and_nothing_runs(tmp_path, load):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(str(marker))}, path)
    with pytest.raises(InputError) as info:
        load(path)
    message = str(info.value)
    assert message == (f"{path}: refused the pickled global {os.system.__module__}.system (whose module "
                       f"{os.system.__module__} is blocked); weights-only loading ran nothing from the file. Re-save "
                       "the weights alone with torch.save(model.state_dict(), path)")
    assert "\n" not in message and not marker.exists()


def test_a_pickled_class_names_its_global_too(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(InputError, match=r"refused the pickled global torch\.nn\.modules\.linear\.Linear \("):
        load_state(tmp_path / "module.pt")
