"""Unit tests for kvmsplit/models_registry.py (finding model variants by name or path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmsplit.errors import HarnessError
from kvmsplit.models_registry import list_models, load_model, model_module
from kvmsplit.split import MERGED, MergedSplit

CUSTOM_MODEL = '''"""custom: never splits eagerly."""

from kvmsplit.split import MergedSplit


class NoEagerSplit(MergedSplit):
    name = "custom"

    def kvm_mmu_slot_try_split_huge_pages(self, kvm, slot, target_level):
        return None


MODEL = NoEagerSplit()
'''


def test_merged_is_the_kernel_policy() -> None:
    assert load_model("merged") is MERGED


def test_v3_is_a_merged_split_subclass_named_v3() -> None:
    model = load_model("v3")
    assert isinstance(model, MergedSplit)
    assert type(model) is not MergedSplit
    assert model.name == "v3"


@pytest.mark.parametrize("name", ["mutants/nonexistent", "nonexistent", "merged.nope"])
def test_load_model_of_an_unknown_name_is_a_harness_error_naming_it(name: str) -> None:
    with pytest.raises(HarnessError, match=rf"no model named '{name}'; `kvmsplit models` lists them"):
        load_model(name)


@pytest.mark.parametrize("name", ["../merged", "mutants/bad-name", ""])
def test_load_model_of_a_name_that_is_no_module_name_is_a_harness_error(name: str) -> None:
    with pytest.raises(HarnessError, match=r"is not 'merged', 'v3', 'mutants/<name>' or a \.py path"):
        load_model(name)


def test_load_model_of_a_py_file_returns_its_model(tmp_path: Path) -> None:
    path = tmp_path / "custom.py"
    path.write_text(CUSTOM_MODEL)
    model = load_model(str(path))
    assert isinstance(model, MergedSplit)
    assert model.name == "custom"
    assert model_module(str(path)).__doc__.startswith("custom: never splits eagerly.")


def test_load_model_of_a_missing_py_file_is_a_harness_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.py"
    with pytest.raises(HarnessError, match="does not exist"):
        load_model(str(path))


def test_load_model_of_a_file_without_model_is_a_harness_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.py"
    path.write_text('"""No MODEL here."""\n')
    with pytest.raises(HarnessError, match=r"defines no MODEL"):
        load_model(str(path))


def test_list_models_lists_merged_first_then_v3() -> None:
    names = list_models()
    assert names[:2] == ["merged", "v3"]
    rest = names[2:]
    assert all(n.startswith("mutants/") for n in rest)
    assert rest == sorted(rest)


def test_every_listed_model_loads_and_says_what_it_changes() -> None:
    for name in list_models():
        model = load_model(name)
        for method in ("kvm_mmu_slot_try_split_huge_pages", "kvm_mmu_try_split_huge_pages"):
            assert callable(getattr(model, method, None)), f"model {name} has no {method}()"
        doc = model_module(name).__doc__ or ""
        assert doc.strip(), f"model {name} has no docstring"
