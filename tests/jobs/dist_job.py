"""One rank of a gloo job on 127.0.0.1, running named scenarios in order (``tests/test_distributed.py``).

Usage: ``python -m tests.jobs.dist_job DIR SCENARIO [SCENARIO ...]`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set. Each scenario writes what it found to
``DIR/<scenario>-w<world>-rank<r>.json``; a scenario that raises records the error and the job goes on,
so one failure shows as a failed assertion, not as a hung group.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import torchckpt
from tests.damage import rot
from tests.doubles import LocalDouble, StorageDouble, remote_double
from tests.jobs import flips, limits, loads, read_once, renames
from torchckpt._storage import registry

TIMEOUT = 20.0  # every collective checkpoint call in these scenarios waits at most this long
INSTALLED = contextlib.ExitStack()  # the storage doubles of the scenario running: removed when it ends


def install(prefix: Path | str, storage: StorageDouble) -> StorageDouble:
    """Serve the paths under ``prefix`` with ``storage`` until the scenario ends (tests/doubles.py)."""
    return INSTALLED.enter_context(registry.installed(str(prefix), storage))


class Cursor:
    """A stateful object whose position differs by rank, declared in its own state_dict()."""

    def __init__(self, pos: int) -> None:
        self.pos = pos

    def state_dict(self) -> dict:
        return {"pos": torchckpt.PerRank(self.pos), "every_rank": 1}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class WithExtra(torch.nn.Linear):
    """A module whose extra state holds a per-rank value."""

    def __init__(self, pos: int) -> None:
        super().__init__(1, 1)
        self.pos = pos
        with torch.no_grad():
            self.weight.fill_(pos)

    def get_extra_state(self) -> dict:
        return {"pos": torchckpt.PerRank(self.pos)}

    def set_extra_state(self, state: dict) -> None:
        self.pos = state["pos"]


class OwnLoaderExtra(WithExtra):
    """The same with a load_state_dict of its own that takes no strict=: it raises on a missing key."""

    def load_state_dict(self, state_dict):  # type: ignore[override]
        return super().load_state_dict(state_dict)


class StrictOwnLoaderExtra(WithExtra):
    """A load_state_dict of its own that takes strict=: handed strict=False, it restores all but that key."""

    def load_state_dict(self, state_dict, strict=True):  # type: ignore[override]
        return super().load_state_dict(state_dict, strict=strict)


class MLP(torch.nn.Module):
    """Uneven on purpose: ``head`` has 5 rows, split 2/2/1/0 over 4 ranks."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 36), torch.nn.ReLU(), torch.nn.Linear(36, 36))
        self.head = torch.nn.Linear(36, 5)
        self.register_buffer("steps_seen", torch.tensor(0, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps_seen += 1
        return self.head(torch.relu(self.body(x)))


def fsdp_mlp(seed: int, mesh=None) -> torch.nn.Module:
    model = MLP(seed)
    for layer in (model.body[0], model.body[2], model.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 16)  # from this rank's RNG: a resumed run draws the same only if it was restored
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": full(v).detach().clone() for k, v in model.state_dict().items()}
    for index, fields in opt.state_dict()["state"].items():
        for field, value in fields.items():
            out[f"opt/{index}/{field}"] = full(value).detach().clone()
    return out


def differences(found: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    bad = sorted(set(found) ^ set(reference))
    bad += [k for k in found if k in reference and not (found[k].dtype == reference[k].dtype
                                                        and torch.equal(found[k], reference[k]))]
    return bad


def io_written() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar")).split()[1])


# -- scenarios ------------------------------------------------------------------------------------


def save_fsdp(d: Path, rank: int, world: int) -> dict:
    """FSDP2 + Adam + an int64 buffer: save with Checkpoint.save, keep references, step once more."""
    torch.manual_seed(100 + rank)
    model = fsdp_mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        step(model, opt)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, rng=torchckpt.RNGState(), cursor=torchckpt.PerRank(100 + rank),
                                loaders=torchckpt.PerRank({0: torch.tensor([10 + rank]), 1: "epoch"}),
                                cfg={"pos": torchckpt.PerRank(rank), "lr": 5},  # per rank within a plain value
                                counter=Cursor(100 + rank))  # and within an object's state_dict()
    path = ckpt.save(str(d / f"fsdp{world}" / "ckpt"), timeout_secs=TIMEOUT)
    reference = full_state(model, opt)
    step(model, opt)  # what an uninterrupted run does next
    after = full_state(model, opt)
    if rank == 0:
        safetensors.torch.save_file(reference, str(d / f"fsdp{world}-reference.safetensors"))
    safetensors.torch.save_file(after, str(d / f"fsdp{world}-after-rank{rank}.safetensors"))
    index = json.loads((Path(path) / "index.json").read_text())
    return {"path": path, "shard_ranks": sorted({s["rank"] for s in index["torchckpt"]["shards"]}),
            "format_version": index["torchckpt"]["format_version"]}


def restore_fsdp(d: Path, rank: int, world: int, saved_world: int) -> dict:
    """A fresh model (another seed) and a never-stepped Adam: restore, compare, step, compare."""
    torch.manual_seed(999)
    model = fsdp_mlp(7)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    cursor = torchckpt.PerRank(-1)
    loaders = torchckpt.PerRank({0: torch.tensor([-1]), 1: ""})
    counter = Cursor(-1)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, rng=torchckpt.RNGState(), cursor=cursor, loaders=loaders,
                                cfg={"pos": None, "lr": 0}, counter=counter)
    status = ckpt.restore(str(d / f"fsdp{saved_world}"), timeout_secs=TIMEOUT)
    reference = safetensors.torch.load_file(str(d / f"fsdp{saved_world}-reference.safetensors"))
    out = {"differences": differences(full_state(model, opt), reference), "cursor": cursor.value,
           "loaders": [int(loaders.value[0]), loaders.value[1]],
           "missing": sorted(status.report.missing_keys), "unexpected": sorted(status.report.unexpected_keys),
           "ranks": status.report.ranks,
           "save_counter": ckpt.save_counter, "cfg": ckpt.cfg, "counter": counter.pos}
    if world == saved_world:
        step(model, opt)
        after = safetensors.torch.load_file(str(d / f"fsdp{saved_world}-after-rank{rank}.safetensors"))
        out["resume_differences"] = differences(full_state(model, opt), after)
        status.assert_consumed()
    return out


def save_fsdp_4(d, rank, world):
    return save_fsdp(d, rank, world)


def save_fsdp_2(d, rank, world):
    return save_fsdp(d, rank, world)


def restore_from_4(d, rank, world):
    return restore_fsdp(d, rank, world, 4)


def restore_from_2(d, rank, world):
    return restore_fsdp(d, rank, world, 2)


def plain_into_fsdp(d: Path, rank: int, world: int) -> dict:
    """A single-process (format 1) checkpoint restored into FSDP2: each rank reads its rows."""
    model = fsdp_mlp(3)
    torchckpt.Checkpoint(model=model).read(str(d / "plain-mlp"), timeout_secs=TIMEOUT).assert_consumed()
    reference = safetensors.torch.load_file(str(d / "plain-mlp-reference.safetensors"))
    found = {f"model/{k}": full(v) for k, v in model.state_dict().items()}
    # probe83 F10: with a load pre-hook on the model (as a migration has), torch's loaders were handed plain
    # tensors to copy into its DTensors, and every restore into it failed ("mixed torch.Tensor and DTensor")
    hooked = fsdp_mlp(4)
    hooked._register_load_state_dict_pre_hook(lambda *args, **kwargs: None)
    torchckpt.Checkpoint(model=hooked).read(str(d / "plain-mlp"), timeout_secs=TIMEOUT).assert_consumed()
    hooked_found = {f"model/{k}": full(v) for k, v in hooked.state_dict().items()}
    path = torchckpt.Checkpoint(model=hooked).write(str(d / "hooked-mlp"), timeout_secs=TIMEOUT)  # FSDP2 -> FSDP2
    again = fsdp_mlp(5)
    again._register_load_state_dict_pre_hook(lambda *args, **kwargs: None)
    torchckpt.Checkpoint(model=again).read(path, timeout_secs=TIMEOUT).assert_consumed()
    hooked_again = {f"model/{k}": full(v) for k, v in again.state_dict().items()}
    # probe85 F3: a pre-hook that renames keys (a migration of old names) or adds one (a new parameter's start)
    # handed torch's loaders plain tensors for them, and the restore failed ("mixed torch.Tensor and DTensor")

    def rename(state, prefix, *args):
        for k in [k for k in state if k.startswith(prefix + "old_head.")]:
            state[prefix + "head." + k[len(prefix + "old_head."):]] = state.pop(k)

    def add_bias(state, prefix, *args):
        state.setdefault(prefix + "head.bias", reference["model/head.bias"].clone())

    migrated = []
    for source, hook in (("renamed-mlp", rename), ("no-bias-mlp", add_bias)):
        fresh = fsdp_mlp(6)
        fresh._register_load_state_dict_pre_hook(hook)
        torchckpt.Checkpoint(model=fresh).read(str(d / source), timeout_secs=TIMEOUT).assert_consumed()
        migrated.append(differences({f"model/{k}": full(v) for k, v in fresh.state_dict().items()}, reference))
    # objects that differ on one rank: every rank's report lists the mismatch (probe30 F1: before,
    # rank 0 said "everything matched" and only rank 1's assertion raised, the others went on)
    path = torchckpt.Checkpoint(t=torch.arange(6.0), n=1).write(str(d / "divergent"), timeout_secs=TIMEOUT)
    status = torchckpt.Checkpoint(t=torch.zeros(6 + rank), n=0).read(path, timeout_secs=TIMEOUT)
    try:
        status.assert_existing_objects_matched()
        asserted = "passed"
    except torchckpt.RestoreMismatchError as e:
        asserted = str(e)
    # one found while a module's own loader runs, after the reads (a pre-hook: Hugging Face, lazy modules)
    class Hooked(torch.nn.Module):
        def __init__(self, extra: bool) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            if extra:
                self.extra = torch.nn.Parameter(torch.zeros(2))
            self._register_load_state_dict_pre_hook(lambda *args, **kwargs: None)

    path = torchckpt.Checkpoint(m=Hooked(False)).write(str(d / "divergent-late"), timeout_secs=TIMEOUT)
    late = torchckpt.Checkpoint(m=Hooked(rank == 1)).read(path, timeout_secs=TIMEOUT).expect_partial()
    # nothing restored on rank 1 alone (probe34 F4: only rank 1's assert_nontrivial_match raised)
    path = torchckpt.Checkpoint(t=torch.arange(6.0)).write(str(d / "nothing-on-one"), timeout_secs=TIMEOUT)
    objects = {"u": torch.zeros(6)} if rank == 1 else {"t": torch.zeros(6)}
    lone = torchckpt.Checkpoint(**objects).read(path, timeout_secs=TIMEOUT).expect_partial()
    try:
        lone.assert_nontrivial_match()
        nontrivial = "passed"
    except torchckpt.RestoreMismatchError as e:
        nontrivial = str(e)
    # one key, two kinds of mismatch on two ranks (probe32 F5): each kind names its rank
    path = torchckpt.Checkpoint(w=torch.zeros(4), d=torchckpt.PerRank({"a": torch.ones(1)} if rank == 0 else {
        "a": torch.ones(1), "x": torch.ones(1)})).write(str(d / "kinds"), timeout_secs=TIMEOUT)
    kinds = torchckpt.Checkpoint(
        w=torch.zeros(5) if rank == 0 else torch.zeros(4, dtype=torch.float64),
        d=torchckpt.PerRank({"a": torch.zeros(1), "x": torch.zeros(1)} if rank == 0 else {"a": torch.zeros(1)}),
    ).read(path, timeout_secs=TIMEOUT).expect_partial()
    # probe84 F1: a single process's per-rank state (RNG streams, PerRank) was handed to every rank
    cursor = torchckpt.PerRank(100 + rank)
    one = torchckpt.Checkpoint(rng=torchckpt.RNGState(), cursor=cursor, w=torch.zeros(2)).read(
        str(d / "one-process-per-rank"), timeout_secs=TIMEOUT).expect_partial()
    # probe88 F1: per-rank values a single process saved in an object's state_dict() or a module's extra state
    # were handed to rank 1 too (rank 0's): each is missing there; the object is left whole, and the module
    # restores all but its extra state (probe89 F1: the whole model was left, its report naming one key)
    counter, extra = Cursor(100 + rank), WithExtra(100 + rank)
    own = torchckpt.Checkpoint(counter=counter, m=extra).read(str(d / "one-process-own-per-rank"), timeout_secs=TIMEOUT)
    own_state = [counter.pos, extra.pos, extra.weight.item(), sorted(own.expect_partial().report.missing_keys)]
    # probe90 F5: a module with a loader of its own was handed its state without that key, and its strict
    # load_state_dict failed the restore on every rank: it is left whole, as an object's load_state_dict is
    loader = OwnLoaderExtra(100 + rank)
    whole = torchckpt.Checkpoint(m=loader).read(str(d / "one-process-own-loader"), timeout_secs=TIMEOUT)
    own_state.append([loader.pos, loader.weight.item(), sorted(whole.expect_partial().report.missing_keys)])
    # probe91 F2: so was one whose loader takes strict=, and under it the model kept its initial weights on rank 1
    strict = StrictOwnLoaderExtra(100 + rank)
    part = torchckpt.Checkpoint(m=strict).read(str(d / "one-process-strict-loader"), timeout_secs=TIMEOUT)
    own_state.append([strict.pos, strict.weight.item(), sorted(part.expect_partial().report.missing_keys)])
    # probe85 F4: the transformers integration resumes such a run on more ranks, as the Trainer does: a rank
    # without saved random state keeps its own, with a warning (the restore asserts everything else)
    from torchckpt.integrations.transformers import _without_rng_of_other_ranks

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _without_rng_of_other_ranks(torchckpt.Checkpoint(rng=torchckpt.RNGState(), w=torch.zeros(2)).read(
            str(d / "one-process-per-rank"), timeout_secs=TIMEOUT)).assert_existing_objects_matched()
    hf_warned = [str(w.message) for w in caught if "keeps its own random state" in str(w.message)]
    # probe84 F2: load_state gave every rank rank 0's per-rank values
    path = torchckpt.save_state({"w": torch.ones(2), "pos": torchckpt.PerRank(10 + rank)}, str(d / "state-per-rank"),
                                timeout_secs=TIMEOUT)
    try:
        beyond = str(torchckpt.load_state(path, rank=2))
    except ValueError as e:
        beyond = str(e)
    with warnings.catch_warnings(record=True) as caught:  # probe85 F6: a rank it has none for, by default: rank 0's
        warnings.simplefilter("always")
        default_beyond = [torchckpt.load_state(str(d / "one-process-per-rank"))["cursor"],
                          [str(w.message) for w in caught if "none of them rank" in str(w.message)]]
    return {"differences": differences(found, reference), "divergent": str(status.report), "kinds": str(kinds.report),
            "hooked_differences": [differences(hooked_found, reference), differences(hooked_again, reference)],
            "migrated_differences": migrated,
            "one_process": [cursor.value, one.report.missing_keys, one.report.ranks, sorted({k.split("/")[0] for k in one.report.restored_keys})],
            "hf_warned": hf_warned, "one_process_own": own_state,
            "load_state": [torchckpt.load_state(path)["pos"], torchckpt.load_state(path, rank=0)["pos"], beyond,
                           default_beyond],
            "kinds_ranks": kinds.report.ranks,
            "ranks": status.report.ranks, "asserted": asserted, "late": str(late.report),
            "nontrivial": nontrivial, "restored_nothing_on": lone.report.restored_nothing_on}


def differing_value(d: Path, rank: int, world: int) -> dict:
    """A plain value and tensors that differ by rank are refused on every rank, naming them: a
    small one (compared whole), one over 1 MiB (by a sample of its bytes, once kept as rank 0's)
    and one over 8 MiB (once written as row blocks of several ranks)."""
    out = {}
    for name, value in (("epoch", rank), ("cursor", torch.tensor([100 + rank])),
                        ("buffer", torch.full((512, 1024), float(rank))), ("noise", torch.full((2600, 2000), float(rank)))):
        try:
            torchckpt.Checkpoint(**{name: value, "same": 1}).write(str(d / f"differ-{name}"), timeout_secs=TIMEOUT)
            out[name] = "saved"
        except torchckpt.CheckpointError as e:
            out[name] = f"{type(e).__name__}: {e}"
    try:  # probe84 F4: tracked on some ranks only (before: "ema (ranks 0, 1, 2, 3), objects/ema (ranks ...)")
        torchckpt.Checkpoint(same=1, **({"ema": torch.arange(4.0)} if rank in (0, 2) else {})).write(
            str(d / "differ-tracked"), timeout_secs=TIMEOUT)
        out["tracked"] = "saved"
    except torchckpt.CheckpointError as e:
        out["tracked"] = str(e)
    out["exists"] = [p.name for p in d.iterdir() if p.name.startswith("differ-")]
    return out


DDP_SIZES = (512, 256, 1024, 128, 768, 64, 384, 896)


def ddp(d: Path, rank: int, world: int) -> dict:
    """DDP-style replicated weights of mixed sizes + Adam: stored once, bytes spread over ranks."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(*[torch.nn.Linear(s, s, bias=False) for s in DDP_SIZES])
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(wrapped.parameters())
    for p in model.parameters():  # the same gradient on every rank, as after DDP's all-reduce
        p.grad = torch.ones_like(p)
    opt.step()
    dist.barrier()
    before = io_written()
    cursor = torchckpt.PerRank({"small": torch.full((3,), rank, dtype=torch.int8),  # stored after "big" by its rank
                                "big": torch.full((2,), rank, dtype=torch.float64)})
    path = torchckpt.Checkpoint(model=wrapped, opt=opt, cursor=cursor).write(str(d / f"ddp{world}"),
                                                                            timeout_secs=TIMEOUT)
    written = io_written() - before
    if rank == 0:
        safetensors.torch.save_file({k: v.clone() for k, v in model.state_dict().items()},
                                    str(d / f"ddp{world}-reference.safetensors"))
    return {"path": path, "written": written}


def tp_mesh(d: Path, rank: int, world: int) -> dict:
    """dp=2 x tp=2: column- then row-parallel layers under FSDP2 on the dp dimension."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = MLP(11)
    parallelize_module(model, mesh["tp"], {"body.0": ColwiseParallel(), "body.2": RowwiseParallel()})
    for layer in (model.body[0], model.body[2], model.head):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(3)  # the same batch on every rank: tp ranks must see the same input
    step(model, opt)
    path = torchckpt.Checkpoint(model=model, opt=opt).write(str(d / "tp"), timeout_secs=TIMEOUT)
    reference = full_state(model, opt)
    if rank == 0:
        safetensors.torch.save_file(reference, str(d / "tp-reference.safetensors"))
    return {"path": path}


def restore_tp(d: Path, rank: int, world: int) -> dict:
    model = fsdp_mlp(8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    torchckpt.Checkpoint(model=model, opt=opt).read(str(d / "tp"), timeout_secs=TIMEOUT).assert_consumed()
    reference = safetensors.torch.load_file(str(d / "tp-reference.safetensors"))
    return {"differences": differences(full_state(model, opt), reference)}


def write_fails_on_one_rank(d: Path, rank: int, world: int) -> dict:
    """Rank 1 may write only a few bytes (RLIMIT_FSIZE): every rank raises, nothing is committed."""
    model = fsdp_mlp(0)
    ckpt = torchckpt.Checkpoint(model=model)
    first = ckpt.save(str(d / "faults" / "ckpt"), timeout_secs=TIMEOUT)
    out: dict = {"first": first}
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        ckpt.save(str(d / "faults" / "ckpt"), timeout_secs=TIMEOUT)
        out["second"] = "saved"
    except torchckpt.CheckpointError as e:
        out["second"] = f"{type(e).__name__}: {e}"
        out["ranks"] = getattr(e, "ranks", None)
    finally:
        if rank == 1:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    out["save_counter"] = ckpt.save_counter
    out["latest"] = torchckpt.latest_checkpoint(str(d / "faults"))
    out["entries"] = sorted(p.name for p in (d / "faults").iterdir())
    return out


def die_after_writing(disk: StorageDouble) -> None:
    """This process is SIGKILLed once it has written and closed its file of the next save (one per rank),
    before it reports it."""
    disk.after("output.close", lambda: os.kill(os.getpid(), signal.SIGKILL))


def killed_mid_save(d: Path, rank: int, world: int) -> dict:
    """Rank 1 is SIGKILLed once it has written its files, before it reports them: the others raise
    within the timeout, and rank 0 removes the uncommitted stage."""
    disk = install(d / "killed", LocalDouble())
    model = fsdp_mlp(0)
    ckpt = torchckpt.Checkpoint(model=model, big=torch.zeros(4 * 2**20) + rank * 0)
    first = ckpt.save(str(d / "killed" / "ckpt"), timeout_secs=TIMEOUT)
    if rank == 1:
        die_after_writing(disk)
    start = time.monotonic()
    try:
        ckpt.save(str(d / "killed" / "ckpt"), timeout_secs=3)
        result = "saved"
    except torchckpt.CheckpointError as e:
        result = f"{type(e).__name__}: {e}"
    return {"first": first, "second": result, "seconds": time.monotonic() - start,
            "latest": torchckpt.latest_checkpoint(str(d / "killed")),
            "entries": sorted(p.name for p in (d / "killed").iterdir())}


def killed_after_commit(d: Path, rank: int, world: int) -> dict:
    """Rank 0 (which serves the c10d store) is SIGKILLed right after it committed, before it tells
    the others: they cannot know the outcome, and must not say that nothing was committed."""
    disk = install(d / "committed", LocalDouble())
    ckpt = torchckpt.Checkpoint(model=fsdp_mlp(0))
    if rank == 0:
        disk.after("stage.commit", lambda *args: os.kill(os.getpid(), signal.SIGKILL))
    try:
        result = ckpt.save(str(d / "committed" / "ckpt"), timeout_secs=3)
    except torchckpt.CheckpointError as e:
        result = f"{type(e).__name__}: {e}"
    return {"second": result, "committed": torchckpt.latest_checkpoint(str(d / "committed"))}


def s3_fsdp(d: Path, rank: int, world: int) -> dict:
    """The FSDP2 save and a resharding restore through the moto S3 server."""
    url = os.environ["TORCHCKPT_TEST_S3"]
    options = {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    torch.manual_seed(100 + rank)
    model = fsdp_mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step(model, opt)
    reference = full_state(model, opt)
    path = torchckpt.Checkpoint(model=model, opt=opt).save(url + "/ckpt", storage_options=options,
                                                           timeout_secs=TIMEOUT)
    fresh = fsdp_mlp(9)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    torchckpt.Checkpoint(model=fresh, opt=fresh_opt).restore(url, storage_options=options,
                                                            timeout_secs=TIMEOUT).assert_consumed()
    if rank == 0:
        safetensors.torch.save_file(reference, str(d / "s3-reference.safetensors"))
    return {"path": path, "differences": differences(full_state(fresh, fresh_opt), reference)}


# -- the manager, async saves and the tools on several ranks (part 2) ----------------------------


def watched(directory: str, options: dict | None = None) -> StorageDouble:
    """The storage a manager of ``directory`` made from now on gets: it records what this rank deletes."""
    return install(directory, remote_double(directory, options) if "://" in directory else LocalDouble())


def deletions(storage: StorageDouble) -> list[str]:
    """The checkpoints deleted through ``storage``, by name, in order."""
    return [os.path.basename(path.rstrip("/")) for path, in storage.called("delete_checkpoint")]


def view(mgr: torchckpt.CheckpointManager) -> list:
    names = lambda ps: [os.path.basename(p) for p in ps]  # noqa: E731
    return [names([mgr.latest_checkpoint or ""])[0], names(mgr.checkpoints),
            names([mgr.best_checkpoint or ""])[0]]


LOSSES = [5.0, 3.0, 4.0, 1.0, 6.0, 7.0, 2.5, 8.0]


def manager_2(d: Path, rank: int, world: int) -> dict:
    """max_to_keep=2, keep_best=1 on a metric, a step interval: rank 0 alone deletes, every rank agrees."""
    model = fsdp_mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step_counter = torch.tensor(0)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, step=step_counter, rng=torchckpt.RNGState())
    inits = []
    storage = watched(str(d / "managed"))
    mgr = torchckpt.CheckpointManager(ckpt, str(d / "managed"), max_to_keep=2, keep_best=1, best_metric="loss",
                                      step_counter=step_counter, checkpoint_interval=2,
                                      init_fn=lambda: inits.append(rank), timeout_secs=TIMEOUT)
    restored = mgr.restore_or_initialize()
    views, returned = [], []
    for i in range(2 * len(LOSSES)):
        step(model, opt)
        step_counter.fill_(i)
        path = mgr.save(metrics={"loss": LOSSES[i // 2]})
        returned.append(os.path.basename(path) if path else None)
        if path:
            views.append(view(mgr))
            reference = full_state(model, opt)  # collective: on every rank
    mgr.close()
    if rank == 0:
        safetensors.torch.save_file(reference, str(d / "managed-reference.safetensors"))
    return {"restored": restored, "inits": inits, "returned": returned, "views": views, "deleted": deletions(storage),
            "on_disk": sorted(p.name for p in (d / "managed").iterdir()), "save_counter": ckpt.save_counter}


def manager_resume(d: Path, rank: int, world: int) -> dict:
    """A new job (another world size) resumes the history: the same latest, kept and best on every
    rank, the same checkpoint restored everywhere, and numbering goes on."""
    model = fsdp_mlp(5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step_counter = torch.tensor(-1)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, step=step_counter, rng=torchckpt.RNGState())
    storage = watched(str(d / "managed"))
    mgr = torchckpt.CheckpointManager(ckpt, str(d / "managed"), max_to_keep=2, keep_best=1, best_metric="loss",
                                      step_counter=step_counter, checkpoint_interval=2,
                                      init_fn=lambda: (_ for _ in ()).throw(AssertionError("init_fn called")),
                                      timeout_secs=TIMEOUT)
    before = view(mgr)
    restored = mgr.restore_or_initialize()
    reference = safetensors.torch.load_file(str(d / "managed-reference.safetensors"))
    found = full_state(model, opt)
    step_counter.add_(2)
    path = mgr.save(metrics={"loss": 0.5})
    out = {"before": before, "restored": restored and os.path.basename(restored),
           "differences": differences(found, reference), "step": int(step_counter), "saved": path and os.path.basename(path),
           "after": view(mgr), "deleted": deletions(storage), "save_counter": ckpt.save_counter}
    mgr.close()
    return out


def second_job(d: Path, rank: int, world: int) -> dict:
    """The test process holds the directory: every rank of this job is refused the same way."""
    try:
        torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(2)), str(d / "held"), timeout_secs=TIMEOUT)
        return {"refused": None}
    except torchckpt.CheckpointError as e:
        return {"refused": f"{type(e).__name__}: {e}"}


ASYNC_SAVES = 20


def async_loops(d: Path, rank: int, world: int) -> dict:
    """20 back-to-back async saves while the main thread runs all_reduce and barrier loops on the
    default group; training changes every value right after each save() returns."""
    model = fsdp_mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step(model, opt)
    marker = torch.zeros(3)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, marker=marker, rng=torchckpt.RNGState())
    mgr = torchckpt.CheckpointManager(ckpt, str(d / f"async{world}"), max_to_keep=None, async_save=True,
                                      timeout_secs=TIMEOUT)
    blocked, collectives = [], 0
    for i in range(1, ASYNC_SAVES + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(i))
            marker.fill_(float(i))
        start = time.perf_counter()
        mgr.save()
        blocked.append(time.perf_counter() - start)
        with torch.no_grad():  # training goes on at once: the checkpoint must hold i, not this
            for p in model.parameters():
                p.fill_(-1.0)
            marker.fill_(-1.0)
        for _ in range(3):
            t = torch.ones(64)
            dist.all_reduce(t)
            dist.barrier()
            collectives += int(t[0].item() == world)
    mgr.wait_until_finished()
    out = {"checkpoints": [os.path.basename(p) for p in mgr.checkpoints], "collectives": collectives,
           "blocked_median": sorted(blocked)[len(blocked) // 2]}
    mgr.close()
    return out


def async_failure(d: Path, rank: int, world: int) -> dict:
    """A full disk on rank 1 in a background save is raised on every rank, at the next save() and
    at wait_until_finished(); nothing of it is committed."""
    import errno

    disk = install(d / "async-fault", LocalDouble())
    model = fsdp_mlp(0)
    ckpt = torchckpt.Checkpoint(model=model)
    mgr = torchckpt.CheckpointManager(ckpt, str(d / "async-fault"), async_save=True, timeout_secs=TIMEOUT,
                                      incremental=False)  # every save writes its files (an unchanged one would be reused)
    out: dict = {"first": os.path.basename(mgr.save())}
    mgr.wait_until_finished()
    for when in ("save", "wait_until_finished"):
        if rank == 1:  # the disk is full for this rank's file
            disk.fail("stage.create", OSError(errno.ENOSPC, "No space left on device"))
        out[f"{when}_returned"] = os.path.basename(mgr.save())  # the failure happens in the background
        try:
            mgr.save() if when == "save" else mgr.wait_until_finished()
            out[when] = "no error"
        except torchckpt.CheckpointError as e:
            out[when] = f"{type(e).__name__}: {e}"
            out[f"{when}_ranks"] = getattr(e, "ranks", None)
        finally:
            disk.heal()
    # The copy into host memory fails on one rank (128 TiB: no host can hold it; the tensor itself is 4
    # bytes, expanded): save() itself raises, on every rank.
    ckpt.extra = torchckpt.PerRank(torch.zeros(1).expand(2**45) if rank == 1 else torch.zeros(1))
    try:
        mgr.save()
        out["snapshot"] = "no error"
    except torchckpt.CheckpointError as e:
        out["snapshot"] = f"{type(e).__name__}: {e}"
    finally:
        del ckpt.extra
    out["last"] = os.path.basename(mgr.save())
    mgr.wait_until_finished()
    out["checkpoints"] = [os.path.basename(p) for p in mgr.checkpoints]
    out["on_disk"] = sorted(p.name for p in (d / "async-fault").iterdir())
    mgr.close()
    return out


def async_next_to_other_calls(d: Path, rank: int, world: int) -> dict:
    """An EMA written and read back while the run's async save is in flight: each call waits for it
    instead of deadlocking against it in the c10d store (before: both waited out timeout_secs)."""
    torch.manual_seed(rank)
    ckpt = torchckpt.Checkpoint(model=fsdp_mlp(0), big=torchckpt.PerRank(torch.randn(8 * 2**20)))  # 32 MB a rank
    mgr = torchckpt.CheckpointManager(ckpt, str(d / "async-next"), async_save=True, incremental=False,
                                      timeout_secs=TIMEOUT)
    ema = torch.nn.Linear(4, 4)
    out: dict = {"seconds": []}
    for i in range(2):
        started = time.monotonic()
        mgr.save()
        torchckpt.Checkpoint(ema=ema).write(d / "async-next-ema" / str(i), timeout_secs=TIMEOUT)
        back = torch.nn.Linear(4, 4)
        torchckpt.Checkpoint(ema=back).restore(d / "async-next-ema" / str(i), timeout_secs=TIMEOUT).assert_consumed()
        out["seconds"].append(time.monotonic() - started)
        out[f"ema_{i}"] = torch.equal(back.weight, ema.weight)
    mgr.wait_until_finished()
    out["checkpoints"] = [os.path.basename(p) for p in mgr.checkpoints]
    mgr.close()
    return out


class Interrupts:
    """A tracked object whose ``state_dict()`` raises ``KeyboardInterrupt`` once armed (Ctrl-C mid-save)."""

    def __init__(self) -> None:
        self.armed = False

    def state_dict(self) -> dict:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return {"v": torch.zeros(2)}

    def load_state_dict(self, state: dict) -> None:
        pass


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Return once ``condition()`` holds; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {condition}")
        time.sleep(0.01)


def ended(call: Callable[[], object]) -> tuple[str, float]:
    """What ``call`` ended with (a line: "no error", "KeyboardInterrupt" or the CheckpointError), and
    how long it took."""
    started = time.monotonic()
    try:
        call()
        result = "no error"
    except (KeyboardInterrupt, SystemExit) as e:
        result = type(e).__name__
    except torchckpt.CheckpointError as e:
        result = f"{type(e).__name__}: {e}"
    return result, time.monotonic() - started


def interrupted_on_one_rank(d: Path, rank: int, world: int) -> dict:
    """Rank 1 is interrupted in the middle of a save and catches it to save a last time, as a
    training loop's ``except KeyboardInterrupt`` does: the other ranks learn at once that the call
    cannot complete (before: they waited out timeout_secs), and the last save pairs on every rank.
    Then rank 1 is interrupted while a call waits for the run's async save in flight, first in a
    call of its own, then while it sends a failure it met before the call's first exchange. Last,
    rank 0's part of an async save stops (``SystemExit``) on the writer's thread."""
    interrupts = Interrupts()
    disk = install(d / "interrupted", LocalDouble())
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=fsdp_mlp(0), interrupts=interrupts),
                                      str(d / "interrupted"), timeout_secs=TIMEOUT, incremental=False)
    out: dict = {"first": os.path.basename(mgr.save())}
    interrupts.armed = rank == 1
    out["interrupted"], out["seconds"] = ended(mgr.save)
    out["last"] = os.path.basename(mgr.save())
    out["checkpoints"] = [os.path.basename(p) for p in mgr.checkpoints]
    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    if rank == 0:  # Ctrl-C on rank 0 as it writes its shard: it removes its stage before it goes on
        disk.before("output.finish", interrupt, times=1)
    out["interrupted_writing"], _ = ended(lambda: mgr.save(checkpoint_number=9))
    out["stages_left"] = [n for n in os.listdir(d / "interrupted") if ".torchckpt-tmp-" in n]
    mgr.close()
    # on an object store rank 0 leaves the upload with its marker, for the next manager to remove:
    # rank 1's shard lands after rank 0 stopped (removed, its late shard would be in no one's upload)
    url = f"file://{d}/interrupted-remote"
    remote = install(url, remote_double(url, {"auto_mkdir": True}))
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=fsdp_mlp(0)), url, timeout_secs=TIMEOUT,
                                      incremental=False)
    mgr.save()
    if rank == 0:
        remote.before("stage.create", interrupt, times=1)
    else:
        remote.before("output.finish", lambda *args: time.sleep(1), times=1)
    out["remote_interrupted"], _ = ended(mgr.save)
    mgr.close()
    with torchckpt.CheckpointManager(torchckpt.Checkpoint(model=fsdp_mlp(0)), url, timeout_secs=TIMEOUT) as mgr:
        out["remote_next"] = os.path.basename(mgr.save())
    remote_dir = d / "interrupted-remote"
    out["remote_left"] = {n: sorted(os.listdir(remote_dir / n)) for n in sorted(os.listdir(remote_dir))
                          if (remote_dir / n).is_dir()}
    disk = install(d / "interrupted-async", LocalDouble())
    model = fsdp_mlp(0)
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=model), str(d / "interrupted-async"),
                                      async_save=True, timeout_secs=TIMEOUT)
    ema = torchckpt.Checkpoint(ema=torch.nn.Linear(2, 2))
    calls = {"waiting": lambda: ema.write(d / "interrupted-ema", timeout_secs=TIMEOUT),
             "sending": lambda: ema.read(d / "interrupted-ema", timeout_secs=TIMEOUT,  # refused on rank 1 alone
                                         storage_options={"anon": True} if rank == 1 else None)}
    for name, call in calls.items():
        started = d / f"interrupted-{name}-started"
        if rank == 0:  # the async save stays in flight 2 s after rank 1's call began (before: 2 s from the commit,
            # which a loaded machine could spend before rank 1's call began: it then completed, "no error")
            disk.before("stage.commit", lambda *args, started=started: (wait_for(started.exists), time.sleep(2)),
                        times=1)
        mgr.save()
        if rank == 1:
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
            started.touch()
        out[name], out[f"{name}_seconds"] = ended(call)
    mgr.wait_until_finished()
    out["async_checkpoints"] = [os.path.basename(p) for p in mgr.checkpoints]

    def stop(*args: object) -> None:
        raise SystemExit(7)

    with torch.no_grad():  # new values: written, not linked from the last checkpoint
        for p in model.parameters():
            p.add_(1)
    if rank == 0:  # rank 0's background part stops as it writes its shard, on the writer's thread
        disk.before("output.finish", stop, times=1)
    mgr.save()
    out["background"], out["background_seconds"] = ended(mgr.wait_until_finished)
    out["after_background"] = os.path.basename(mgr.save())
    mgr.wait_until_finished()
    out["after_background_checkpoints"] = [os.path.basename(p) for p in mgr.checkpoints]
    out["after_background_stages"] = [n for n in os.listdir(d / "interrupted-async") if ".torchckpt-tmp-" in n]
    mgr.close()
    return out


def arguments_on_one_rank(d: Path, rank: int, world: int) -> dict:
    """A manager constructed with an argument one rank alone refuses, or one rank alone passes: the
    same error on every rank at once (before: the refusing rank raised, the others waited out
    timeout_secs, and the next calls were out of step); the next construction pairs."""
    ckpt = torchckpt.Checkpoint(model=fsdp_mlp(0))
    directory = str(d / "arguments")
    cases = {"max_to_keep": {"max_to_keep": 0 if rank == 1 else 3},
             "init_fn": {"init_fn": (lambda: None) if rank == 0 else None},
             "step_counter": {"checkpoint_interval": 5, "step_counter": torch.tensor(0) if rank == 0 else None},
             "timeout_secs": {"timeout_secs": -1 if rank == 1 else TIMEOUT},
             "preemption_signals": {"preemption_signals": (signal.SIGKILL,) if rank == 1 else ()}}
    out: dict = {}
    for case, options in cases.items():
        out[case], out[f"{case}_seconds"] = ended(
            lambda options=options: torchckpt.CheckpointManager(ckpt, directory, **{"timeout_secs": TIMEOUT,
                                                                                   **options}).close())
    out["write_timeout"], out["write_timeout_seconds"] = ended(  # a call's own coordinator: refused in the call
        lambda: ckpt.write(d / "arguments-write", timeout_secs=True if rank == 1 else TIMEOUT))
    mgr = torchckpt.CheckpointManager(ckpt, directory, timeout_secs=TIMEOUT, keep_best=1, best_metric="loss")
    out["saved"] = os.path.basename(mgr.save())
    with warnings.catch_warnings(record=True) as caught:  # metrics on rank 0 alone are fine; differing ones are heard
        warnings.simplefilter("always")
        mgr.save(metrics={"loss": 1.0} if rank == 0 else None)
        mgr.save(metrics={"loss": float(rank)})
        mgr.save(metrics={"loss": float(-rank)})  # said once
    out["metrics_warned"] = [str(w.message) for w in caught]
    out["metrics"] = [mgr.metrics_of(p) for p in mgr.checkpoints]
    mgr.close()
    if rank == 0:  # the history is rebuilt, with a warning: an error where warnings are errors, on every rank
        (d / "arguments" / "checkpoints.json").write_text("{damaged")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            torchckpt.CheckpointManager(ckpt, directory, timeout_secs=TIMEOUT)
            out["warned"] = "no error"
        except UserWarning as e:
            out["warned"] = f"{type(e).__name__}: {e}"
    mgr = torchckpt.CheckpointManager(ckpt, directory, timeout_secs=TIMEOUT)  # the failed one let go of its claim
    out["reopened"] = os.path.basename(mgr.latest_checkpoint or "")  # rebuilt: kept, never deleted
    mgr.close()
    return out


def claim_after_a_rank_gave_up(d: Path, rank: int, world: int) -> dict:
    """Rank 0 claims the directory after rank 1 gave up on the construction (its claim is slow): the
    construction fails on both, and rank 0 lets go of the claim it took (before: held until exit)."""
    import fcntl

    directory = d / "gave-up"
    disk = install(directory, LocalDouble())
    if rank == 0:
        disk.before("claim", lambda *args: time.sleep(7), times=1)  # past rank 1's wait for the outcome: 6 s
    out: dict = {}
    try:
        torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(1)), str(directory), timeout_secs=0.5)
        out["opened"] = "no error"
    except torchckpt.CheckpointError as e:
        out["opened"] = type(e).__name__
    if rank == 0:  # another open file description: its flock fails while this process holds the claim
        with open(directory / ".torchckpt.lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                out["claim_free"] = True
            except BlockingIOError:
                out["claim_free"] = False
    return out


def after_commit_fails(d: Path, rank: int, world: int) -> dict:
    """Rank 0's bookkeeping fails once a checkpoint is committed: an old checkpoint that retention
    cannot delete is warned about and the save stands; a state file that cannot be written fails
    the save on every rank, and every rank's history still names what was committed."""
    import errno
    import warnings

    directory = d / "after-commit"
    disk = install(directory, LocalDouble())
    model = fsdp_mlp(0)
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=model), str(directory), max_to_keep=1,
                                      timeout_secs=TIMEOUT)
    out: dict = {"first": os.path.basename(mgr.save())}
    if rank == 0:
        disk.fail("delete_checkpoint", PermissionError(errno.EPERM, "Operation not permitted"), times=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["undeletable"] = os.path.basename(mgr.save())
    out["warned"] = [str(w.message) for w in caught if "was not deleted" in str(w.message)]
    out["view_undeletable"] = view(mgr)
    if rank == 0:
        disk.fail("replace_file", OSError(errno.ENOSPC, "No space left on device"), times=1)
    out["unrecorded"], _ = ended(mgr.save)
    out["view_unrecorded"] = view(mgr)
    out["restored"] = os.path.basename(mgr.restore_or_initialize())
    out["next"] = os.path.basename(mgr.save())
    out["view_next"] = view(mgr)
    if rank == 0:  # Ctrl-C once the state file names the new checkpoint, before retention ran
        def interrupt(*args: object) -> None:
            raise KeyboardInterrupt

        disk.after("replace_file", interrupt, times=1)
    out["interrupted"], _ = ended(mgr.save)
    out["view_interrupted"] = view(mgr)
    out["restored_after_interrupt"] = os.path.basename(mgr.restore_or_initialize())
    out["after_interrupt"] = os.path.basename(mgr.save())
    out["view_after_interrupt"] = view(mgr)
    if rank == 0:  # Ctrl-C once the save is done, as rank 0 starts its background work: the save stands
        disk.before("stage.settle", lambda *args, **kwargs: interrupt(), times=1)
    out["settling"], _ = ended(mgr.save)
    out["settled"] = [view(mgr), mgr.checkpoint.save_counter]
    out["after_settling"] = os.path.basename(mgr.save())
    mgr.close()
    out["on_disk"] = sorted(p.name for p in directory.iterdir())
    # the same Ctrl-C in Checkpoint.save's record: every rank takes the number all the same
    ckpt = torchckpt.Checkpoint(model=fsdp_mlp(0))
    prefix = str(directory / "plain" / "ckpt")
    ckpt.save(prefix, timeout_secs=TIMEOUT)
    if rank == 0:
        disk.after("replace_file", interrupt, times=1)
    out["plain_interrupted"], _ = ended(lambda: ckpt.save(prefix, timeout_secs=TIMEOUT))
    out["plain_counter"] = ckpt.save_counter
    out["plain_next"], _ = ended(lambda: ckpt.save(prefix, timeout_secs=TIMEOUT))
    if rank == 0:  # and once Checkpoint.save is done, as rank 0 starts its background work
        disk.before("stage.settle", lambda *args, **kwargs: interrupt(), times=1)
    out["plain_settling"], _ = ended(lambda: ckpt.save(prefix, timeout_secs=TIMEOUT))
    out["plain_settled"] = ckpt.save_counter
    out["plain_after_settling"], _ = ended(lambda: ckpt.save(prefix, timeout_secs=TIMEOUT))
    return out


def killed_async(d: Path, rank: int, world: int) -> dict:
    """Rank 0 is SIGKILLed in a background save once its files are written: rank 1 raises within
    the timeout, and the stage rank 0 left is for the next job to clean up."""
    disk = install(d / "killed-async", LocalDouble())
    model = fsdp_mlp(0)
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=model), str(d / "killed-async"), async_save=True,
                                      timeout_secs=3, incremental=False)  # the second save writes its files
    first = mgr.save()
    mgr.wait_until_finished()
    if rank == 0:
        die_after_writing(disk)
    start = time.monotonic()
    try:  # save() itself raises when rank 0 dies before this rank's part of it is done (a race)
        mgr.save()
        mgr.wait_until_finished()
        result = "saved"
    except torchckpt.CheckpointError as e:
        result = f"{type(e).__name__}: {e}"
    later = []  # rank 0 served the c10d store: every later call must fail typed, never with a raw DistError
    for call in (mgr.save, mgr.restore_or_initialize,
                 lambda: torchckpt.Checkpoint(model=model).write(str(d / "after-death"), timeout_secs=3)):
        try:
            call()
            later.append("ok")
        except Exception as e:
            later.append(f"{type(e).__module__}.{type(e).__name__}: {e}")
    return {"first": first, "second": result, "seconds": time.monotonic() - start, "later": later,
            "entries": sorted(p.name for p in (d / "killed-async").iterdir())}


def manager_s3(d: Path, rank: int, world: int) -> dict:
    """A manager on 4 ranks saving into s3:// (moto): rank 0 claims with a lease and deletes."""
    url = os.environ["TORCHCKPT_TEST_S3"] + "/managed"
    options = {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    model = fsdp_mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt)
    storage = watched(url, options)
    mgr = torchckpt.CheckpointManager(ckpt, url, max_to_keep=2, storage_options=options, timeout_secs=TIMEOUT)
    views = []
    for _ in range(3):
        step(model, opt)
        mgr.save()
        views.append(view(mgr))
    reference = full_state(model, opt)  # collective: on every rank
    if rank == 0:
        safetensors.torch.save_file(reference, str(d / "s3-managed-reference.safetensors"))
    mgr.close()
    return {"views": views, "deleted": deletions(storage)}


TOOLS_BIG_ROWS = 4096  # the largest tensor: 4096 x 4096 float32, 64 MiB


def tools_save(d: Path, rank: int, world: int) -> dict:
    """An FSDP2 checkpoint with sharded int64 and bool tensors and one 64 MiB tensor, for the tools."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    model = fsdp_mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step(model, opt)

    def sharded(full_tensor: torch.Tensor) -> DTensor:
        local = full_tensor.chunk(world)[rank].clone()
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=full_tensor.shape,
                                  stride=full_tensor.stride())

    gen = torch.Generator().manual_seed(4)
    table = torch.randint(-2**40, 2**40, (8, 4), generator=gen)
    mask = torch.rand(8, 3, generator=gen) > 0.5
    big = torch.rand(TOOLS_BIG_ROWS, 4096, generator=gen)
    ckpt = torchckpt.Checkpoint(model=model, opt=opt, table=sharded(table), mask=sharded(mask), big=sharded(big),
                                rng=torchckpt.RNGState(), cursor=torchckpt.PerRank(100 + rank))
    path = ckpt.write(str(d / "tools" / "ckpt-1"), timeout_secs=TIMEOUT)
    reference = {**full_state(model, opt), "table": table, "mask": mask, "big": big}  # collective
    if rank == 0:
        safetensors.torch.save_file(reference, str(d / "tools-reference.safetensors"))
    return {"path": path}


class FlakyOnce:
    """State whose ``state_dict()`` raises once, on one rank only (a data loader's hiccup)."""

    def __init__(self, fails: bool) -> None:
        self.fails = fails

    def state_dict(self) -> dict:
        if self.fails:
            self.fails = False
            raise RuntimeError("data loader hiccup")
        return {"position": 7}

    def load_state_dict(self, state: dict) -> None:
        pass


def one_rank_fails_capture(d: Path, rank: int, world: int) -> dict:
    """Rank 1's state_dict() raises at the first of three saves, and the loop goes on: that save
    fails on every rank, and the next ones pair step with step (plain write, save, a manager, an
    async manager)."""
    out = {}
    for mode in ("write", "save", "manager", "manager_async"):
        model = fsdp_mlp(0)
        ckpt = torchckpt.Checkpoint(model=model, loader=FlakyOnce(rank == 1), step=0)
        base = d / "one_fails" / mode
        mgr = None
        if mode.startswith("manager"):
            mgr = torchckpt.CheckpointManager(ckpt, str(base), max_to_keep=None, async_save=mode == "manager_async",
                                              timeout_secs=TIMEOUT)
        steps = []
        for i in (1, 2, 3):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float(i))
            ckpt.step = i
            start = time.perf_counter()
            try:
                if mode == "write":
                    path = ckpt.write(str(base / f"step-{i}"), timeout_secs=TIMEOUT)
                elif mode == "save":
                    path = ckpt.save(str(base / "ckpt"), timeout_secs=TIMEOUT)
                else:
                    path = mgr.save()
                    mgr.wait_until_finished()
                steps.append({"step": i, "path": path})
            except torchckpt.CheckpointError as e:
                steps.append({"step": i, "error": f"{type(e).__name__}: {e}", "ranks": getattr(e, "ranks", None),
                              "seconds": time.perf_counter() - start})
        if mgr is not None:
            steps.append({"checkpoints": [os.path.basename(p) for p in mgr.checkpoints]})
            mgr.close()
        out[mode] = steps
    return out


def record(out: dict, name: str, call) -> None:
    """Run ``call``; record under ``name`` "ok" or its CheckpointError (and its ``.ranks``), and the seconds it took."""
    start = time.perf_counter()
    try:
        call()
        out[name] = "ok"
    except torchckpt.CheckpointError as e:
        out[name] = f"{type(e).__name__}: {e}"
        out[f"{name}_ranks"] = getattr(e, "ranks", None)
        out[f"{name}_key"] = getattr(e, "key", None)
    out[f"{name}_seconds"] = time.perf_counter() - start


def mismatched_calls(d: Path, rank: int, world: int) -> dict:
    """Ranks that pass another path, async flag, shard size or restore path are refused on every
    rank, and the next matching call works."""
    model = fsdp_mlp(0)
    ckpt = torchckpt.Checkpoint(model=model)
    base = d / "mismatch"
    if rank == 0:  # someone's folder, which a write must not replace (the first call, refused, pairs the ranks)
        (base / "notes").mkdir(parents=True)
        (base / "notes" / "todo.txt").write_text("keep me")

        def someone_makes_their_folder(*args):  # at the path, while the ranks write their files
            (base / "meanwhile" / "src").mkdir(parents=True)
            (base / "meanwhile" / "train.py").write_text("precious")

        install(base / "meanwhile", LocalDouble()).after("output.finish", someone_makes_their_folder, times=1)
    calls = {
        "path": lambda: ckpt.write(str(base / f"rank{rank}"), timeout_secs=TIMEOUT),
        "async_save": lambda: ckpt.write(str(base / "async"), async_save=rank == 0, timeout_secs=TIMEOUT),
        "max_shard_size": lambda: ckpt.write(str(base / "size"), max_shard_size=2**20 if rank else "2MB",
                                             timeout_secs=TIMEOUT),
        "save_counter": lambda: ckpt.save(str(base / "counted"), timeout_secs=TIMEOUT),
        "good": lambda: ckpt.write(str(base / "good"), timeout_secs=TIMEOUT),
        "over_other_files": lambda: ckpt.write(str(base / "notes"), timeout_secs=TIMEOUT),
        "appears_meanwhile": lambda: ckpt.write(str(base / "meanwhile"), timeout_secs=TIMEOUT),
        "restore": lambda: ckpt.restore(str(base / ("good" if rank else "counted-1")), timeout_secs=TIMEOUT),
        "manager": lambda: torchckpt.CheckpointManager(ckpt, str(base / "managed"), max_to_keep=2 + rank,
                                                       timeout_secs=TIMEOUT),
    }
    if rank == 1:
        object.__setattr__(ckpt, "_save_counter", 5)  # as if rank 1 had made saves that rank 0 did not
    out: dict = {}
    for name, call in calls.items():
        record(out, name, call)
        if name == "save_counter":
            object.__setattr__(ckpt, "_save_counter", 0)
    out["exists"] = sorted(p.name for p in base.iterdir())
    return out


class RaisesOnLoad:
    """State whose ``load_state_dict()`` raises on one rank only."""

    def __init__(self, raises: bool) -> None:
        self.raises = raises

    def state_dict(self) -> dict:
        return {"x": 1}

    def load_state_dict(self, state: dict) -> None:
        if self.raises:
            raise RuntimeError("cannot take this state")


def restore_failures(d: Path, rank: int, world: int) -> dict:
    """A restore that fails on rank 1 only says "partly restored" on rank 0, which had restored its
    part; a restore that rank 1 reaches after the timeout says nothing was restored on rank 0 and
    that the call was abandoned on rank 1; the next call pairs correctly."""
    path = str(d / "restore-fails")
    torchckpt.Checkpoint(model=fsdp_mlp(0), extra=RaisesOnLoad(False)).write(path, timeout_secs=TIMEOUT)
    out: dict = {}
    model = fsdp_mlp(1)
    for name, call in (
        ("fails_on_1", lambda: torchckpt.Checkpoint(model=model, extra=RaisesOnLoad(rank == 1)).restore(
            path, timeout_secs=TIMEOUT)),
        ("late", lambda: (time.sleep(4) if rank == 1 else None,
                          torchckpt.Checkpoint(model=model).restore(path, timeout_secs=2))),
        ("next", lambda: torchckpt.Checkpoint(model=model).write(str(d / "after-late"), timeout_secs=TIMEOUT)),
    ):
        record(out, name, call)
    out["restored"] = torch.equal(full(model.head.weight), MLP(0).head.weight.detach())
    return out


def flip_tensor_byte(checkpoint: Path, name: str) -> None:
    """Flip one bit in the middle of tensor ``name``'s bytes in its shard (as a failing disk would)."""
    index = json.loads((checkpoint / "index.json").read_text())
    shard = checkpoint / index["weight_map"][name]
    data = bytearray(shard.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + header_size])[name]["data_offsets"]
    data[8 + header_size + (start + end) // 2] ^= 0x10
    shard.write_bytes(bytes(data))


def damage_header_of_rank(checkpoint: Path, writer: int) -> None:
    """Make a shard written by rank ``writer`` say I32 where its first tensor is F32 (the same size):
    a header that disagrees with the index, which only a reader of that shard checks."""
    index = json.loads((checkpoint / "index.json").read_text())
    shard = checkpoint / next(s["file"] for s in index["torchckpt"]["shards"] if s["rank"] == writer)
    data = bytearray(shard.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    at = data.index(b'"F32"', 8, 8 + header_size)
    data[at : at + 5] = b'"I32"'
    shard.write_bytes(bytes(data))


def resumed_with_fallback(base: Path) -> dict:
    """A fresh model resumed by a manager from ``base``: the checkpoint it restored, the step, the
    DamagedCheckpointWarnings it gave, and the distinct values of the parameters."""
    fresh = fsdp_mlp(1)
    resumed = torchckpt.Checkpoint(model=fresh, step=0)
    mgr = torchckpt.CheckpointManager(resumed, str(base), timeout_secs=TIMEOUT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = mgr.restore_or_initialize()
    mgr.close()
    return {"restored": restored, "step": resumed.step, "left": mgr.last_restore.report.left_from_damaged,
            "warnings": [str(w.message) for w in caught if w.category is torchckpt.DamagedCheckpointWarning],
            "values": sorted({v for p in fresh.parameters() for v in full(p).flatten().tolist()})}


def damaged_on_one_rank(d: Path, rank: int, world: int) -> dict:
    """The latest of three checkpoints has a flipped byte in a chunk only rank 1 reads: both ranks
    warn and fall back to the checkpoint before it. Then the header of a shard only rank 1 reads in
    that one disagrees with its index: rank 1 alone finds it (rank 0 never checks a header it does
    not read), and both fall back to the first."""
    base = d / "damaged-one-rank"
    model = fsdp_mlp(0)
    ckpt = torchckpt.Checkpoint(model=model, step=0)
    mgr = torchckpt.CheckpointManager(ckpt, str(base), max_to_keep=None, timeout_secs=TIMEOUT)
    for i in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(i))
        ckpt.step = i
        mgr.save()
    mgr.close()
    dist.barrier()
    if rank == 0:
        index = json.loads((base / "ckpt-3" / "index.json").read_text())
        chunk = next(n for n in index["weight_map"] if n.startswith("model/body.2.weight") and n.endswith("18,0"))
        flip_tensor_byte(base / "ckpt-3", chunk)
    dist.barrier()
    out = resumed_with_fallback(base)
    dist.barrier()
    if rank == 0:
        damage_header_of_rank(base / "ckpt-2", writer=1)
    dist.barrier()
    out.update({f"header_{k}": v for k, v in resumed_with_fallback(base).items()})
    untouched = fsdp_mlp(1)  # read directly: refused on both ranks before either reads a byte
    before = {k: full(v).clone() for k, v in untouched.state_dict().items()}
    record(out, "header_read", lambda: torchckpt.Checkpoint(model=untouched).read(str(base / "ckpt-2"),
                                                                                  timeout_secs=TIMEOUT))
    out["header_read_untouched"] = all(torch.equal(full(v), before[k]) for k, v in untouched.state_dict().items())
    # a tensor tracked after ckpt-1 and damaged in ckpt-2: read in place, then the fallback has none (probe38 F1)
    grown = d / "grown-damaged"
    ckpt = torchckpt.Checkpoint(w=torch.zeros(64))
    with torchckpt.CheckpointManager(ckpt, str(grown), timeout_secs=TIMEOUT) as mgr:
        mgr.save()
        ckpt.ema = torch.full((64,), 5.0)
        mgr.save()
    dist.barrier()
    if rank == 0:
        flip_tensor_byte(grown / "ckpt-2", "ema")
    dist.barrier()
    with torchckpt.CheckpointManager(torchckpt.Checkpoint(w=torch.zeros(64), ema=torch.zeros(64)), str(grown),
                                     timeout_secs=TIMEOUT) as mgr, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["grown_restored"] = mgr.restore_or_initialize()
        out["grown_left"] = mgr.last_restore.report.left_from_damaged
    return out


def calls_stay_paired(d: Path, rank: int, world: int) -> dict:
    """A restore while an async save is in flight; a restore(None) on one rank only, and the
    calls after it; per-rank values tracked in another order on each rank; a strict resume that
    mismatches on one rank only."""
    out: dict = {}
    base = d / "paired"
    model = torch.nn.Linear(4, 4)
    ckpt = torchckpt.Checkpoint(model=model)
    first = ckpt.write(str(base / "a"), timeout_secs=TIMEOUT)
    start = time.perf_counter()
    try:
        ckpt.write(str(base / "b"), async_save=True, timeout_secs=TIMEOUT)
        ckpt.restore(first, timeout_secs=TIMEOUT)
        ckpt.wait_until_finished()
        out["async_then_restore"] = "ok"
    except torchckpt.CheckpointError as e:
        out["async_then_restore"] = f"{type(e).__name__}: {e}"
    out["async_then_restore_seconds"] = time.perf_counter() - start
    for name, call in (("none_on_one_rank", lambda: ckpt.restore(None if rank else first, timeout_secs=TIMEOUT)),
                       ("next", lambda: ckpt.write(str(base / "c"), timeout_secs=TIMEOUT)),
                       ("after", lambda: ckpt.restore(str(base / "c"), timeout_secs=TIMEOUT))):
        record(out, name, call)
    values = {"a": torchckpt.PerRank(10 * rank + 1), "b": torchckpt.PerRank(10 * rank + 2)}
    ordered = dict(reversed(list(values.items()))) if rank else values
    torchckpt.Checkpoint(**ordered).write(str(base / "per-rank"), timeout_secs=TIMEOUT)
    fresh = torchckpt.Checkpoint(a=torchckpt.PerRank(0), b=torchckpt.PerRank(0))
    fresh.read(str(base / "per-rank"), timeout_secs=TIMEOUT).assert_consumed()
    out["per_rank"] = [fresh.a.value, fresh.b.value]
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=torch.nn.Linear(4, 4)), str(base / "run"),
                                      timeout_secs=TIMEOUT)
    mgr.save()
    mgr.close()
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=torch.nn.Linear(4, 8 if rank else 4)),
                                      str(base / "run"), timeout_secs=TIMEOUT)
    try:
        mgr.restore_or_initialize(strict=True)
        out["strict"] = "ok"
    except torchckpt.RestoreMismatchError as e:
        out["strict"] = f"{type(e).__name__}: {e}"
        out["strict_ranks"] = getattr(e, "ranks", None)
        out["strict_report_mine"] = bool(e.report)
        out["strict_report_ranks"] = {k: tuple(v) for k, v in e.report.ranks.items()}
    mgr.close()
    return out


# -- incremental saves on several ranks -----------------------------------------------------------


class FrozenMLP(torch.nn.Module):
    """A frozen backbone (``requires_grad=False``) under a trainable head: the backbone's shards are
    the same from save to save, the head's and its optimizer state's are not."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
        self.head = torch.nn.Linear(64, 5)
        self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(x)))


def fsdp_frozen(seed: int) -> tuple[FrozenMLP, torch.optim.Optimizer]:
    """A :class:`FrozenMLP` under FSDP2, layer by layer, and Adam over its trainable parameters."""
    model = FrozenMLP(seed)
    for layer in (model.backbone[0], model.backbone[2], model.head):
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)


def writers(checkpoint: str) -> dict[str, int]:
    """Each shard file of ``checkpoint`` and the rank that wrote it."""
    section = json.loads((Path(checkpoint) / "index.json").read_text())["torchckpt"]
    return {s["file"]: s["rank"] for s in section["shards"]}


def restored_differences(checkpoint: str, reference: dict[str, torch.Tensor]) -> list[str]:
    """What a fresh FSDP2 model and optimizer (another seed) restored from ``checkpoint`` hold
    unlike ``reference``; every saved value must be consumed."""
    model, opt = fsdp_frozen(7)
    torchckpt.Checkpoint(model=model, opt=opt).restore(checkpoint, timeout_secs=TIMEOUT).assert_consumed()
    return differences(full_state(model, opt), reference)


def incremental_round(d: Path, rank: int, async_save: bool) -> dict:
    """A manager saves, training steps, it saves again (and training goes on at once); then the
    first checkpoint is deleted by hand and the second restored again."""
    directory = d / ("incremental-async" if async_save else "incremental")
    torch.manual_seed(200 + rank)
    model, opt = fsdp_frozen(0)
    step(model, opt)
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=model, opt=opt), str(directory),
                                      async_save=async_save, timeout_secs=TIMEOUT)
    first = mgr.save()
    mgr.wait_until_finished()
    step(model, opt)
    reference = full_state(model, opt)  # as of the second save (collective)
    second = mgr.save()
    step(model, opt)  # training goes on while an async save runs: the checkpoint holds the state as of save()
    mgr.wait_until_finished()
    mgr.close()
    index = json.loads((Path(second) / "index.json").read_text())
    reused = index["torchckpt"].get("reused") or {"files": {}}
    frozen = sorted({f for n, f in index["weight_map"].items() if n.startswith("model/backbone.")})
    before, after = writers(first), writers(second)
    out = {"first": os.path.basename(first), "second": os.path.basename(second), "frozen_files": frozen,
           "base": reused.get("base"), "reused_files": sorted(reused["files"]),
           "same_writer": [after[f] == before.get(source) for f, source in sorted(reused["files"].items())],
           "reusing_ranks": sorted({after[f] for f in reused["files"]}),
           "links": [os.stat(Path(second) / f).st_nlink for f in frozen],
           "differences": restored_differences(second, reference)}
    dist.barrier()
    if rank == 0:
        shutil.rmtree(first)
    dist.barrier()
    out["links_after_delete"] = [os.stat(Path(second) / f).st_nlink for f in frozen]
    out["differences_after_delete"] = restored_differences(second, reference)
    if rank == 0:
        safetensors.torch.save_file(reference, str(directory.with_name(directory.name + "-reference.safetensors")))
    return out


def incremental_fsdp(d: Path, rank: int, world: int) -> dict:
    """FSDP2 with a frozen backbone, saved twice by a manager with incremental saves (the default),
    sync then async: each rank reuses its own files of the backbone."""
    return {"sync": incremental_round(d, rank, async_save=False), "async": incremental_round(d, rank, async_save=True)}


def damaged_then_saved(d: Path, rank: int, world: int) -> dict:
    """Rank 1's file of the frozen backbone rots after the second save linked it; a restore finds it
    (on rank 1, the one that reads it), and the next incremental save must not link it again: rank 1
    reads it back and writes it afresh, rank 0 still links its own intact file."""
    directory = d / "damaged-then-saved"
    torch.manual_seed(300 + rank)
    model, opt = fsdp_frozen(0)
    step(model, opt)
    mgr = torchckpt.CheckpointManager(torchckpt.Checkpoint(model=model, opt=opt), str(directory),
                                      timeout_secs=TIMEOUT)
    mgr.save()
    time.sleep(0.05)  # the filesystem's clock ticks between a file's last write and the next index
    step(model, opt)
    second = mgr.save()
    index = json.loads((Path(second) / "index.json").read_text())
    frozen = {writers(second)[f]: f for f in index["torchckpt"]["reused"]["files"]}  # rank -> its linked file
    dist.barrier()
    if rank == 0:
        rot(str(Path(second) / frozen[1]))  # rank 1's file, its stamp unchanged
    dist.barrier()
    out: dict = {"linked_in_second": sorted(frozen)}
    fresh, fresh_opt = fsdp_frozen(7)  # the damaged bytes land in these, not in the run's model
    try:
        torchckpt.Checkpoint(model=fresh, opt=fresh_opt).restore(second, timeout_secs=TIMEOUT)
        out["restore"] = "ok"
    except torchckpt.CorruptCheckpointError as e:
        out["restore"] = f"{type(e).__name__}: {e}"
        out["damaged_paths"] = sorted(os.path.relpath(p, directory) for p in getattr(e, "damaged_paths", ()))
    step(model, opt)
    reference = full_state(model, opt)
    third = mgr.save()
    mgr.close()
    section = json.loads((Path(third) / "index.json").read_text())["torchckpt"]
    out["third"] = os.path.basename(third)
    out["reused_in_third"] = sorted((section.get("reused") or {"files": {}})["files"].values())
    out["frozen_names"] = {str(r): f for r, f in frozen.items()}
    out["links_in_third"] = {str(r): os.stat(Path(third) / f).st_nlink for r, f in frozen.items()}
    out["differences"] = restored_differences(third, reference)
    return out


def read_outcome(model: torch.nn.Module, path: str) -> str | dict:
    """What restoring ``model`` from ``path`` gave: "no error", or the error's type, message and errno."""
    try:
        torchckpt.Checkpoint(model=model).read(path, timeout_secs=TIMEOUT)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"type": type(e).__name__, "message": str(e), "errno": getattr(e, "errno", None)}
    return "no error"


def opens_its_own_shards(d: Path, rank: int, world: int) -> dict:
    """FSDP2 parameters alone, saved and restored by the same ranks: which shards each rank opens
    (it reads only its own part)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    path = torchckpt.Checkpoint(model=model).write(str(d / "own-shards"), timeout_secs=TIMEOUT)
    disk = install(d / "own-shards", LocalDouble())
    opened: list[str] = []
    disk.before("open", lambda file, what: opened.append(os.path.basename(file)) if what == "Shard" else None)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    for layer in fresh:
        fully_shard(layer)
    fully_shard(fresh)
    torchckpt.Checkpoint(model=fresh).read(path, timeout_secs=TIMEOUT).assert_consumed()
    shards = json.loads((Path(path) / "index.json").read_text())["torchckpt"]["shards"]
    out = {"opened": sorted(opened), "own": sorted(s["file"] for s in shards if s["rank"] == rank),
           "shards": len(shards),
           "equal": all(torch.equal(full(a), full(b)) for a, b in zip(model.state_dict().values(),
                                                                     fresh.state_dict().values()))}
    # The process's own errors at that (lazy) open: an s3fs-style PermissionError without an errno on
    # rank 1, then EMFILE on rank 0. Each is a CheckpointReadError on every rank, with its errno.
    for failing, error in ((1, PermissionError("Access Denied")), (0, OSError(errno.EMFILE, os.strerror(errno.EMFILE)))):
        if rank == failing:
            disk.fail("open", error, times=1)
        out[f"failing{failing}"] = read_outcome(fresh, path)
    # Another checkpoint of the same structure takes the path (as a save under the same number does)
    # after the ranks read the index, before they open their shards: not damage, on every rank.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    other = torchckpt.Checkpoint(model=model).write(str(d / "own-shards-next"), timeout_secs=TIMEOUT)
    aside = Path(path + ".old")

    def replace_before_opening(file: str, what: str) -> None:
        if rank == 0:
            os.rename(path, aside)
            os.rename(other, path)
        deadline = time.monotonic() + TIMEOUT
        while not aside.exists() and time.monotonic() < deadline:  # rank 1 opens only once rank 0 replaced it
            time.sleep(0.01)

    disk.heal()  # the first case's recorder too
    disk.before("open", replace_before_opening, times=1)
    out["replaced"] = read_outcome(fresh, path)
    # A third checkpoint of the same structure takes the path once rank 0 has read the index, opened
    # its shard and checked that the index is still the one it read; only then does rank 1 read the
    # index: each rank's own checks pass, each against another checkpoint.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    third = torchckpt.Checkpoint(model=model).write(str(d / "own-shards-third"), timeout_secs=TIMEOUT)
    go = d / "split-go"

    def replace_after_confirming(file: str, what: str) -> None:
        if what == "Index" and not go.exists():
            os.rename(path, path + ".second")
            os.rename(third, path)
            go.touch()

    def wait_for_the_replacement(*args: object) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    disk.heal()
    if rank == 0:
        disk.after("open", replace_after_confirming)
    else:
        disk.before("read_file", wait_for_the_replacement, times=1)
    out["split"] = read_outcome(fresh, path)
    return out


def strided_shards(d: Path, rank: int, world: int) -> dict:
    """On a 2 x 2 mesh: a strided shard whose local rows are one block (FSDP2 over tensor
    parallelism) saves and restores exactly; one whose rows are spread out is refused by key, at
    save and as a restore's destination (it was read as one block: the wrong rows)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (2, 2))
    t = torch.arange(24, dtype=torch.float32).reshape(8, 3)
    blocks = distribute_tensor(t, mesh, [_StridedShard(0, split_factor=2), Shard(0)])
    spread = distribute_tensor(t, mesh, [Shard(0), _StridedShard(0, split_factor=2)])
    out: dict = {}
    path = str(d / "strided-blocks")
    torchckpt.Checkpoint(st={"t": blocks}).write(path, timeout_secs=TIMEOUT)
    into = distribute_tensor(torch.zeros(8, 3), mesh, [_StridedShard(0, split_factor=2), Shard(0)])
    torchckpt.Checkpoint(st={"t": into}).read(path, timeout_secs=TIMEOUT).assert_consumed()
    out["blocks_exact"] = torch.equal(into.full_tensor(), t)
    # the same along dimension 1 (FSDP2 with Shard(1) over RowwiseParallel)
    wide = t.T.contiguous()
    columns = distribute_tensor(wide, mesh, [_StridedShard(1, split_factor=2), Shard(1)])
    torchckpt.Checkpoint(st={"t": columns}).write(str(d / "strided-columns"), timeout_secs=TIMEOUT)
    back = distribute_tensor(torch.zeros(3, 8), mesh, [_StridedShard(1, split_factor=2), Shard(1)])
    torchckpt.Checkpoint(st={"t": back}).read(str(d / "strided-columns"), timeout_secs=TIMEOUT).assert_consumed()
    out["columns_exact"] = torch.equal(back.full_tensor(), wide)
    for what, call in (("save", lambda: torchckpt.Checkpoint(st={"t": spread}).write(str(d / "strided-spread"),
                                                                                     timeout_secs=TIMEOUT)),
                       ("restore", lambda: torchckpt.Checkpoint(st={"t": spread}).read(path, timeout_secs=TIMEOUT))):
        try:
            call()
            out[what] = "no error"
        except torchckpt.CheckpointError as e:
            out[what] = {"type": type(e).__name__, "message": str(e), "key": getattr(e, "key", None)}
    out["spread_untouched"] = torch.equal(spread.full_tensor(), t)
    try:  # a DTensor in a per-rank value: refused with what to pass instead
        torchckpt.Checkpoint(st={"a": torchckpt.PerRank(blocks)}).write(str(d / "strided-per-rank"),
                                                                          timeout_secs=TIMEOUT)
        out["per_rank"] = "no error"
    except torchckpt.CheckpointError as e:
        out["per_rank"] = f"{type(e).__name__}: {e}"
    # a DTensor whose local tensor is not the chunk its layout gives the rank (from_local trusts it):
    # refused by key before anything is written (before: an I/O error blaming the storage at commit)
    from torch.distributed.tensor import DTensor

    rows = mesh.get_coordinate()[0] * 2 + mesh.get_coordinate()[1]
    off = DTensor.from_local(t[:3].clone() if rows == 0 else t[:1].clone(), mesh, [Shard(0), Shard(0)],
                             run_check=False, shape=(6, 3), stride=(3, 1))
    try:
        torchckpt.Checkpoint(st={"off": off}).write(str(d / "strided-off"), timeout_secs=TIMEOUT)
        out["off_layout"] = "no error"
    except torchckpt.CheckpointError as e:
        out["off_layout"] = f"{type(e).__name__}: {e}"
    return out


def empty_dtensors(d: Path, rank: int, world: int) -> dict:
    """Empty DTensors sharded along a dimension that is not empty (a frozen Linear(0, 4) under
    FSDP2: its weight is (4, 0), each rank's chunk a different empty box) save as one process saves
    them, whole, and restore."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(0, 4))
    model[1].requires_grad_(False)
    fully_shard(model, mesh=mesh)
    empty = distribute_tensor(torch.zeros(0, 4), mesh, [Shard(1)])
    path = str(d / "empty-dtensors")
    torchckpt.Checkpoint(model=model, st={"e": empty}).write(path, timeout_secs=TIMEOUT)
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(0, 4))
    fully_shard(target, mesh=mesh)
    into = distribute_tensor(torch.ones(0, 4), mesh, [Shard(1)])
    torchckpt.Checkpoint(model=target, st={"e": into}).read(path, timeout_secs=TIMEOUT).assert_consumed()
    local = [(a.to_local(), b.to_local()) for a, b in zip(model.state_dict().values(), target.state_dict().values())]
    same = all(a.shape == b.shape and torch.equal(a, b) for a, b in local)  # (torch's full_tensor fails on (4, 0))
    return {"same": same, "shape": list(into.shape)}


SCENARIOS = {f.__name__: f for f in (save_fsdp_4, save_fsdp_2, restore_from_4, restore_from_2, plain_into_fsdp,
                                      differing_value, ddp, tp_mesh, restore_tp, write_fails_on_one_rank,
                                      killed_mid_save, s3_fsdp, manager_2, manager_resume, second_job,
                                      async_loops, async_failure, after_commit_fails, async_next_to_other_calls,
                                      interrupted_on_one_rank, arguments_on_one_rank, claim_after_a_rank_gave_up,
                                      killed_async, manager_s3, tools_save,
                                      one_rank_fails_capture, mismatched_calls, restore_failures,
                                      damaged_on_one_rank, calls_stay_paired, incremental_fsdp,
                                      damaged_then_saved, opens_its_own_shards, killed_after_commit, strided_shards,
                                      empty_dtensors)}
SCENARIOS.update(flips.SCENARIOS)
SCENARIOS.update(renames.SCENARIOS)
SCENARIOS.update(loads.SCENARIOS)
SCENARIOS.update(read_once.SCENARIOS)
SCENARIOS.update(limits.SCENARIOS)


LOSES_A_RANK = {"killed_async", "killed_after_commit"}


def main() -> None:
    directory = Path(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        for name in sys.argv[2:]:
            try:
                result = SCENARIOS[name](directory, rank, world)
            except Exception as e:
                result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            finally:
                INSTALLED.close()
            (directory / f"{name}-w{world}-rank{rank}.json").write_text(json.dumps(result, default=str))
            if name in LOSES_A_RANK:  # the group cannot be torn down cleanly without the dead rank
                os._exit(0)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
