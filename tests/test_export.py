"""``torchckpt export``: a folder Hugging Face tools load as their own."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import torchckpt
from torchckpt.cli import main

from .conftest import make_mlp


class DDPLike(torch.nn.Module):
    """What DistributedDataParallel's state_dict looks like: every key under ``module.``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def exported_state(out) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(out, name)))
    return state


@pytest.mark.parametrize("wrap", ["ddp", "compile"])
def test_prefixes_are_stripped_as_restore_strips_them(tmp_path, wrap):
    model = make_mlp(4)
    wrapped = DDPLike(model) if wrap == "ddp" else torch.compile(model)
    assert all(k.startswith(("module.", "_orig_mod.")) for k in wrapped.state_dict())
    path = torchckpt.Checkpoint(model=wrapped).write(tmp_path / "c")
    assert main(["export", path, "--object", "model", str(tmp_path / "out")]) == 0
    fresh = make_mlp(0)
    fresh.load_state_dict(exported_state(tmp_path / "out"), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_a_re_export_replaces_the_folder_as_a_whole(tmp_path):
    path = torchckpt.Checkpoint(model=make_mlp(1)).write(tmp_path / "c")
    out = tmp_path / "out"
    assert main(["export", path, "--object", "model", str(out), "--max-shard-size", "100B"]) == 0
    assert "model.safetensors.index.json" in os.listdir(out) and len(os.listdir(out)) > 2
    later = torchckpt.Checkpoint(model=make_mlp(2)).write(tmp_path / "d")
    assert main(["export", later, "--object", "model", str(out)]) == 0
    assert os.listdir(out) == ["model.safetensors"]  # no stale shard or index of the first export
    fresh = make_mlp(0)
    fresh.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    assert torch.equal(fresh[0].weight, make_mlp(2)[0].weight)
    assert [n for n in os.listdir(tmp_path) if "torchckpt-" in n] == []


def test_a_folder_with_other_files_is_never_replaced(tmp_path, capsys):
    path = torchckpt.Checkpoint(model=make_mlp(1)).write(tmp_path / "c")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", path, "--object", "model", str(out)]) == 1
    assert "holds files an export does not write (notes.txt)" in capsys.readouterr().err
    assert os.listdir(out) == ["notes.txt"]


@pytest.mark.parametrize("earlier", [False, True], ids=["new-folder", "re-export"])
def test_a_folder_that_appears_while_exporting_is_left_alone(tmp_path, disk, capsys, earlier):
    """OUT is checked before anything is written and again right before the commit: files put
    there in between (a user's folder, another export's with its notes) are never replaced."""
    path = torchckpt.Checkpoint(model=make_mlp(1)).write(tmp_path / "c")
    out = tmp_path / "out"
    if earlier:
        assert main(["export", path, "--object", "model", str(out)]) == 0

    def appear(*args: object) -> None:
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("keep me")

    disk.after("output.finish", appear, times=1)
    assert main(["export", path, "--object", "model", str(out)]) == 1
    err = capsys.readouterr().err
    assert "holds files an export does not write (notes.txt)" in err
    assert "It appeared while the export was being written; nothing was replaced." in err
    assert sorted(os.listdir(out)) == (["model.safetensors", "notes.txt"] if earlier else ["notes.txt"])
    assert (out / "notes.txt").read_text() == "keep me"
    assert [n for n in os.listdir(tmp_path) if "torchckpt-" in n] == []  # no stage left


def test_weights_an_export_does_not_write_are_never_replaced(tmp_path, capsys):
    """Any model*.safetensors passed for an earlier export's weights: a save_pretrained folder's
    model_ema.safetensors beside model.safetensors was deleted."""
    path = torchckpt.Checkpoint(model=make_mlp(1)).write(tmp_path / "c")
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "model_ema.safetensors"):
        (out / name).write_bytes(b"{}")
    assert main(["export", path, "--object", "model", str(out)]) == 1
    assert "holds files an export does not write (model_ema.safetensors)" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "model_ema.safetensors"]


def test_a_folder_holding_only_someones_config_is_never_replaced(tmp_path, capsys):
    path = torchckpt.Checkpoint(model=make_mlp(1)).write(tmp_path / "c")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"hand": "written"}')  # a file an export writes, but no weights beside it
    assert main(["export", path, "--object", "model", str(out)]) == 1
    assert "holds config.json but no weights, so it is no earlier export" in capsys.readouterr().err
    assert os.listdir(out) == ["config.json"] and json.loads((out / "config.json").read_text()) == {"hand": "written"}


@pytest.mark.parametrize("names", [["transformer.wte.weight", "transformer.h.0.mlp.bias"],
                                   ["module.a", "module.b"], ["x._orig_mod.w", "y"]],
                         ids=["plain", "all-under-module", "orig-mod"])  # before: the wrappers' prefixes went
def test_a_converted_folder_exports_again_as_the_folder_it_was(tmp_path, names):
    weights = {name: torch.randn(5 - i, 3) for i, name in enumerate(names)}
    folder = tmp_path / "hf"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(weights, folder / "model.safetensors")
    converted = torchckpt.convert(folder, tmp_path / "c")  # top-level names are the tensors: no module to name
    assert main(["export", converted, str(tmp_path / "again")]) == 0  # no --object: every tensor, by its name
    back = load_file(tmp_path / "again" / "model.safetensors")
    assert back.keys() == weights.keys() and all(torch.equal(back[k], v) for k, v in weights.items())


def test_without_object_two_names_that_export_as_one_key_are_refused(tmp_path, capsys):
    path = torchckpt.save_state({"model": {"w": torch.ones(2)}, "model/w": torch.zeros(3)}, tmp_path / "c")
    assert main(["export", path, str(tmp_path / "out")]) == 1
    assert "'model/w' and 'model~1w' both export as 'model/w'; rename one of them." in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class Averaged(torch.nn.Module):
    """A model average that keeps its copy as a child named ``module`` (timm's ``ModelEmaV2``): no wrapper."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.module = make_mlp(seed)
        self.register_buffer("num_updates", torch.tensor(seed))


def test_a_child_named_module_beside_other_keys_is_no_wrapper_and_keeps_its_prefix(tmp_path):
    path = torchckpt.Checkpoint(ema=Averaged(3)).write(tmp_path / "c")
    assert main(["export", path, "--object", "ema", str(tmp_path / "out")]) == 0
    exported = exported_state(tmp_path / "out")
    assert set(exported) == set(Averaged(0).state_dict())
    fresh = Averaged(0)
    fresh.load_state_dict(exported, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), Averaged(3).state_dict().values()))
    from safetensors.torch import save_file

    names = {"module.weight": torch.ones(2, 2), "module.bias": torch.zeros(2), "step": torch.tensor(3)}
    save_file(names, tmp_path / "saved.safetensors")  # a wrapper's keys beside its own: exported back as they were
    converted = torchckpt.convert(tmp_path / "saved.safetensors", tmp_path / "d")
    assert main(["export", converted, str(tmp_path / "back")]) == 0
    assert set(load_file(tmp_path / "back" / "model.safetensors")) == set(names)


def test_a_re_export_without_config_keeps_the_folders_own(tmp_path, gpt2, capsys):
    _, _, model = gpt2
    model.save_pretrained(tmp_path / "hf")  # model.safetensors and config.json, as a user has them
    (tmp_path / "hf" / "generation_config.json").unlink()  # (a file an export does not write: refused, as tested above)
    config = (tmp_path / "hf" / "config.json").read_text()
    path = torchckpt.Checkpoint(model=model).write(tmp_path / "c")
    assert main(["export", path, "--object", "model", str(tmp_path / "hf")]) == 0
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    assert (tmp_path / "hf" / "config.json").read_text() == config
    (tmp_path / "hf" / "config.json").write_text("{ not json")  # refused, and named for what it is
    assert main(["export", path, "--object", "model", str(tmp_path / "hf")]) == 1
    assert "config.json, kept as no --config was given, is not valid JSON" in capsys.readouterr().err


def test_a_dict_of_tensors_and_a_module_tracked_twice_export(tmp_path):
    model = make_mlp(1)
    state = torchckpt.save_state({"model": model.state_dict(), "epoch": 3}, tmp_path / "s")
    assert main(["export", state, "--object", "model", str(tmp_path / "d")]) == 0
    fresh = make_mlp(0)
    fresh.load_state_dict(exported_state(tmp_path / "d"), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    twice = torchckpt.Checkpoint(a=model, b=model).write(tmp_path / "t")  # b's tensors are stored as a's
    assert main(["export", twice, "--object", "b", str(tmp_path / "b")]) == 0
    assert exported_state(tmp_path / "b").keys() == model.state_dict().keys()


def test_config_is_copied_once_it_is_a_json_object(tmp_path, capsys):
    path = torchckpt.Checkpoint(model=make_mlp(1)).write(tmp_path / "c")
    (tmp_path / "config.json").write_text('{"model_type": "mlp"}')
    assert main(["export", path, "--object", "model", str(tmp_path / "out"), "--config", str(tmp_path / "config.json")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"model_type": "mlp"}
    for bad, message in (("{", "is not valid JSON"), ("[1, 2]", "holds a JSON list, not an object"),
                         ("[" * 100_000 + "]" * 100_000, "nests JSON too deeply")):  # was a RecursionError
        (tmp_path / "bad.json").write_text(bad)
        assert main(["export", path, "--object", "model", str(tmp_path / "out"), "--config",
                     str(tmp_path / "bad.json")]) == 1
        assert message in capsys.readouterr().err
        assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"model_type": "mlp"}  # left as it was


@pytest.fixture
def gpt2(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=101)
    torch.manual_seed(0)
    return transformers, config, transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("wrap", ["plain", "compile", "ddp"])
def test_from_pretrained_loads_the_export_exactly(tmp_path, gpt2, wrap):
    transformers, config, model = gpt2
    config.save_pretrained(tmp_path / "cfg")
    tracked = {"plain": model, "compile": torch.compile(model), "ddp": DDPLike(model)}[wrap]
    path = torchckpt.Checkpoint(model=tracked).write(tmp_path / "c")
    out = tmp_path / "out"
    assert main(["export", path, "--object", "model", str(out), "--config", str(tmp_path / "cfg" / "config.json")]) == 0
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set()), info
    loaded.eval()
    tokens = torch.tensor([[1, 5, 9, 100, 42]])
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_the_export_is_as_small_as_save_pretrained(tmp_path, gpt2):
    _, _, model = gpt2
    model.save_pretrained(tmp_path / "hf")
    path = torchckpt.Checkpoint(model=model).write(tmp_path / "c")
    assert main(["export", path, "--object", "model", str(tmp_path / "out")]) == 0
    ours, theirs = exported_state(tmp_path / "out"), exported_state(tmp_path / "hf")
    assert sorted(ours) == sorted(theirs)  # the tied lm_head.weight is left out by both
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    size = lambda d: sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.endswith(".safetensors"))  # noqa: E731
    assert abs(size(tmp_path / "out") - size(tmp_path / "hf")) < 1024
