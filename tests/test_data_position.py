"""Data position: a ``StatefulDataLoader`` and ``RNGState`` resume mid-epoch exactly; a
``torch.Generator`` is tracked; a plain ``DataLoader`` and a class are refused by key."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import torchckpt

from .distributed import run_ranks

pytest.importorskip("torchdata.stateful_dataloader")
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

from .jobs import data_job  # noqa: E402


@pytest.mark.parametrize(("num_workers", "stop_at"), [(0, 2), (0, 4), (0, 6), (2, 4), (2, 10)],
                         ids=["0-workers-mid-epoch-1", "0-workers-end-of-epoch-1", "0-workers-mid-epoch-2",
                              "2-workers-end-of-epoch-1", "2-workers-mid-epoch-3"])
def test_interrupted_run_resumes_exactly(tmp_path, num_workers, stop_at):
    """Saved at ``stop_at`` (4 batches an epoch), resumed into fresh objects under another global
    seed: the same batches, bit-equal weights and the same global generator after 4 epochs."""
    whole = data_job.uninterrupted(tmp_path / "whole", num_workers)
    resumed = data_job.interrupted_and_resumed(tmp_path / "ckpt", num_workers, stop_at)
    assert resumed["seen"] == whole["seen"]
    assert all(torch.equal(p, q) for p, q in zip(resumed["weights"], whole["weights"]))
    assert torch.equal(resumed["draw"], whole["draw"])


def test_interrupted_run_resumes_exactly_on_two_ranks(tmp_path):
    """DDP over gloo with a DistributedSampler, 0 and 2 workers: each rank sees the same batches
    and ends with the same weights as an uninterrupted run (one spawn runs all of it)."""
    codes = run_ranks(2, tmp_path, [], timeout=120, module="tests.jobs.data_job")
    logs = "\n".join((tmp_path / f"data_job-w2-rank{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs
    found = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(found):
        assert "error" not in result, result["error"]
        for workers in ("workers0", "workers2"):
            assert result[workers]["resumed_seen"] == result[workers]["seen"], (rank, workers)
            assert result[workers]["same"], (rank, workers)
    assert found[0]["workers0"]["seen"] != found[1]["workers0"]["seen"]  # each rank its own share


def loader(dataset, generator: torch.Generator | None) -> StatefulDataLoader:
    return StatefulDataLoader(dataset, batch_size=2, shuffle=True, generator=generator)


def test_loader_without_a_generator_warns_at_save(tmp_path):
    ckpt = torchckpt.Checkpoint(loader=loader(list(range(6)), None))
    with pytest.warns(UserWarning, match=r"no generator.*generator=torch\.Generator\(\)\.manual_seed"):
        ckpt.write(tmp_path / "c")
    assert "generator" not in json.loads((tmp_path / "c" / "index.json").read_text())["torchckpt"]["state"]["loader"]


def test_loader_with_a_generator_saves_without_warning(tmp_path, recwarn):
    torchckpt.Checkpoint(loader=loader(list(range(6)), torch.Generator().manual_seed(0))).write(tmp_path / "c")
    assert not [w for w in recwarn if "generator" in str(w.message)]


def _samplers():
    from torch.utils.data import BatchSampler, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

    data = list(range(12))
    own = torch.Generator().manual_seed(1)
    return {
        "random-own-generator": (dict(sampler=RandomSampler(data, generator=own)), "RandomSampler", "a generator of its own"),
        "random-global": (dict(sampler=RandomSampler(data)), "RandomSampler", "the global random generator"),
        "weighted": (dict(sampler=WeightedRandomSampler([1.0] * 12, 12, generator=own)), "WeightedRandomSampler",
                     "a generator of its own"),
        "subset": (dict(sampler=SubsetRandomSampler(data, generator=own)), "SubsetRandomSampler", "a generator of its own"),
        "in-a-batch-sampler": (dict(batch_sampler=BatchSampler(RandomSampler(data, generator=own), 3, False)),
                               "RandomSampler", "a generator of its own"),
        "own-generator-under-another-name": (dict(sampler=_ShufflesWithItsRng(data, own)), "_ShufflesWithItsRng",
                                             "a generator of its own"),
    }


class _ShufflesWithItsRng(torch.utils.data.Sampler):
    """A user's sampler whose generator is not called ``generator``."""

    def __init__(self, data, rng: torch.Generator) -> None:
        self.data, self.rng = data, rng

    def __iter__(self):
        return iter(torch.randperm(len(self.data), generator=self.rng).tolist())

    def __len__(self) -> int:
        return len(self.data)


@pytest.mark.parametrize("case", list(_samplers()))
def test_a_sampler_that_draws_its_order_without_state_warns_at_save(tmp_path, case):
    # torchdata draws such a sampler's order again on resume: other samples for the rest of the epoch
    kwargs, name, source = _samplers()[case]
    data = StatefulDataLoader(list(range(12)), **({"batch_size": 3} if "sampler" in kwargs else {}), **kwargs,
                              generator=torch.Generator())
    with pytest.warns(UserWarning, match=rf"sampler \({name}\) draws its order from {source}.*keeps no state.*"
                                         r"torchdata\.stateful_dataloader\.sampler\.RandomSampler"):
        torchckpt.Checkpoint(loader=data).write(tmp_path / "c")


def test_samplers_that_resume_exactly_save_without_a_warning(tmp_path, recwarn):
    from torch.utils.data.distributed import DistributedSampler
    from torchdata.stateful_dataloader.sampler import RandomSampler

    data = list(range(12))
    for i, kwargs in enumerate([dict(shuffle=True), dict(shuffle=False),
                                dict(sampler=RandomSampler(data, generator=torch.Generator().manual_seed(1))),
                                dict(sampler=DistributedSampler(data, num_replicas=2, rank=0))]):
        loader = StatefulDataLoader(data, batch_size=3, generator=torch.Generator(), **kwargs)
        torchckpt.Checkpoint(loader=loader).write(tmp_path / f"c{i}")
    assert not [w for w in recwarn if "sampler" in str(w.message)]


def test_torchdata_random_sampler_with_its_own_generator_resumes_mid_epoch_exactly(tmp_path):
    # what the warning recommends: stopped in the middle of the third epoch, the same batches follow
    from torchdata.stateful_dataloader.sampler import RandomSampler

    def build():
        data = list(range(12))
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(42))
        return StatefulDataLoader(data, batch_size=3, sampler=sampler, generator=torch.Generator().manual_seed(0))

    reference = build()
    whole = [b.tolist() for _ in range(4) for b in reference]
    first = build()
    seen = [b.tolist() for _ in range(2) for b in first]
    it = iter(first)
    seen += [next(it).tolist() for _ in range(2)]  # stopped in the middle of the third epoch
    torchckpt.Checkpoint(loader=first).write(tmp_path / "c")
    fresh = build()
    torchckpt.Checkpoint(loader=fresh).read(tmp_path / "c").assert_consumed()
    rest = [b.tolist() for b in fresh] + [b.tolist() for b in fresh]  # the rest of it, and the fourth
    assert seen + rest == whole


class _Stream(torch.utils.data.IterableDataset):
    """Six items an epoch from a counter that goes on across epochs (a stream with its own state)."""

    def __init__(self) -> None:
        self.pos = 0

    def __iter__(self):
        for _ in range(6):
            self.pos += 1
            yield self.pos

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


@pytest.mark.parametrize(("num_workers", "persistent", "source"), [
    (0, False, "shuffle"), (2, False, "shuffle"), (2, True, "shuffle"),
    (0, False, "sampler"), (0, False, "stream"), (2, False, "stream"),  # probe36 F1, F2
])
def test_an_epoch_left_early_is_not_resumed_the_next_iteration_starts_a_new_one(tmp_path, num_workers, persistent,
                                                                                 source):
    """A loop left with ``break`` (a validation of a few batches, a fixed number of steps per epoch)
    and saved after it: an uninterrupted run's next ``for batch in loader`` starts a new epoch, and
    so does the resumed one's (probe35 F1: it went on with the rest of the epoch left), with its
    sampler's and its dataset's own state (probe36: a first fix dropped them with no workers)."""
    from torchdata.stateful_dataloader.sampler import RandomSampler

    def build():
        data = _Stream() if source == "stream" else list(range(12))
        options = {"shuffle": True} if source == "shuffle" else {} if source == "stream" else {
            "sampler": RandomSampler(data, generator=torch.Generator().manual_seed(7))}
        return StatefulDataLoader(data, batch_size=3, num_workers=num_workers, persistent_workers=persistent,
                                  generator=torch.Generator().manual_seed(0), **options)

    def epoch(loader, limit=2):
        out = []
        for i, batch in enumerate(loader):
            out.append(batch.tolist())
            if i + 1 == limit:
                break
        return out

    reference = build()
    whole = [epoch(reference) for _ in range(2)] + [epoch(reference, 4), epoch(reference)]
    first = build()
    seen = [epoch(first)]
    torchckpt.Checkpoint(loader=first).write(tmp_path / "c")
    fresh = build()
    torchckpt.Checkpoint(loader=fresh).read(tmp_path / "c").assert_consumed()
    assert seen + [epoch(fresh), epoch(fresh, 4), epoch(fresh)] == whole


@pytest.mark.parametrize(("num_workers", "stop_at"), [(0, 2), (2, 2), (0, 4), (2, 4)],
                         ids=["0-workers-mid-epoch", "2-workers-mid-epoch", "0-workers-end-of-epoch",
                              "2-workers-end-of-epoch"])
def test_a_run_restored_and_saved_again_before_its_next_batch_resumes_exactly(tmp_path, num_workers, stop_at):
    """probe75: a job restored mid-epoch and saved again before it drew a batch (preempted again
    right after its restart) was saved as an epoch left early, and the next resume skipped the
    rest of the epoch (after an epoch's last batch: trained one epoch more)."""

    def build():
        return StatefulDataLoader(list(range(11)), batch_size=3, shuffle=True, num_workers=num_workers,
                                  generator=torch.Generator().manual_seed(0))

    reference = build()
    whole = [b.tolist() for _ in range(3) for b in reference]  # 4 batches an epoch
    first, seen = build(), []
    for batch in first:
        seen.append(batch.tolist())
        if len(seen) == stop_at:
            torchckpt.Checkpoint(loader=first).write(tmp_path / "first")
            break  # the process dies here
    second = build()
    torchckpt.Checkpoint(loader=second).read(tmp_path / "first").assert_consumed()
    torchckpt.Checkpoint(loader=second).write(tmp_path / "second")  # at once: preempted again
    third = build()
    torchckpt.Checkpoint(loader=third).read(tmp_path / "second").assert_consumed()
    resumed = seen + [b.tolist() for b in third]  # the rest of the first epoch (none, saved at its last batch)
    resumed += [b.tolist() for _ in range(2) for b in third]  # and the next two
    assert resumed == whole


def test_loader_missing_from_the_checkpoint_is_reported(tmp_path):
    path = torchckpt.Checkpoint(step=1).write(tmp_path / "c")
    status = torchckpt.Checkpoint(step=0, loader=loader(list(range(6)), torch.Generator())).read(path)
    assert status.report.missing_keys == ["loader"]


@pytest.mark.parametrize(("saved_generator", "restored_generator", "field"),
                         [(True, False, "unexpected_keys"), (False, True, "missing_keys")],
                         ids=["saved-with-restored-without", "saved-without-restored-with"])
def test_a_generator_on_one_side_only_is_reported(tmp_path, recwarn, saved_generator, restored_generator, field):
    """The position is restored, but the next epochs' order comes from elsewhere than the saved
    run's: the generator's state is reported, not silently dropped (or silently absent)."""
    saving = loader(list(range(6)), torch.Generator().manual_seed(3) if saved_generator else None)
    running = iter(saving)  # its loop still running at the save: the position is the one to resume
    next(running)
    path = torchckpt.Checkpoint(loader=saving).write(tmp_path / "c")
    restoring = loader(list(range(6)), torch.Generator().manual_seed(4) if restored_generator else None)
    status = torchckpt.Checkpoint(loader=restoring).read(path)
    assert getattr(status.report, field) == ["loader/generator"]
    assert "loader" in status.report.restored_keys
    with pytest.raises(torchckpt.RestoreMismatchError, match="loader/generator"):
        status.assert_consumed()


@pytest.mark.parametrize(("saved_with", "restored_with"), [(0, 2), (2, 0), (2, 1)])
def test_loader_saved_with_other_workers_is_skipped_and_reported(tmp_path, saved_with, restored_with):
    """torchdata cannot resume across worker counts: the loader is left as it is, and reported."""
    saving = StatefulDataLoader(list(range(8)), batch_size=2, num_workers=saved_with, generator=torch.Generator())
    running = iter(saving)  # its loop still running at the save: the position is the one to resume
    next(running)
    path = torchckpt.Checkpoint(loader=saving, step=1).write(tmp_path / "c")
    restoring = StatefulDataLoader(list(range(8)), batch_size=2, num_workers=restored_with, generator=torch.Generator())
    ckpt = torchckpt.Checkpoint(loader=restoring, step=0)
    report = ckpt.read(path).report
    assert report.missing_keys == ["loader"]
    assert re.search(rf"saved with num_workers={saved_with}, this loader has num_workers={restored_with}",
                     report.skipped_objects["loader"])
    assert ckpt.step == 1
    assert [b.tolist() for b in restoring] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # from the start


def test_a_position_saved_in_another_sampler_split_is_skipped_and_reported(tmp_path):
    """A DistributedSampler's position means other samples once the data is split another way
    (a checkpoint of 4 ranks restored on 2): the loader starts its epoch afresh, and says so."""
    from torch.utils.data.distributed import DistributedSampler

    def loader(replicas: int) -> StatefulDataLoader:
        sampler = DistributedSampler(list(range(16)), num_replicas=replicas, rank=1, shuffle=False)
        return StatefulDataLoader(list(range(16)), batch_size=2, sampler=sampler, generator=torch.Generator())

    saving = loader(4)
    running = iter(saving)  # its loop still running at the save: the position is the one to resume
    next(running)
    path = torchckpt.Checkpoint(loader=saving).write(tmp_path / "c")
    restoring = loader(2)
    report = torchckpt.Checkpoint(loader=restoring).read(path).report
    assert report.missing_keys == ["loader"]
    assert "saved by rank 1 of a sampler split 4 ways, and this loader's sampler is rank 1 of 2" in \
        report.skipped_objects["loader"]
    assert [b.tolist() for b in restoring][0] == [1, 3]  # from the start of its own share
    same = loader(4)
    assert not torchckpt.Checkpoint(loader=same).read(path).report  # the same split resumes
    assert [b.tolist() for b in same] == [[9, 13]]


@pytest.fixture
def drawn_generator() -> torch.Generator:
    """A generator that has drawn: its state is not the one a seed gives."""
    generator = torch.Generator().manual_seed(3)
    torch.rand(5, generator=generator)
    return generator


@pytest.mark.parametrize("where", ["top-level", "dict", "list", "per-rank"])
def test_generator_round_trip(tmp_path, drawn_generator, where):
    wrap = {"top-level": lambda g: g, "dict": lambda g: {"noise": g}, "list": lambda g: [0, g],
            "per-rank": torchckpt.PerRank}[where]
    path = torchckpt.Checkpoint(gen=wrap(drawn_generator)).write(tmp_path / "c")
    expected = torch.rand(4, generator=drawn_generator)
    fresh = torch.Generator().manual_seed(99)
    torchckpt.Checkpoint(gen=wrap(fresh)).read(path).assert_consumed()
    assert torch.equal(torch.rand(4, generator=fresh), expected)
    if where == "top-level":
        assert json.loads((tmp_path / "c" / "index.json").read_text())["torchckpt"]["objects"] == {"gen": "generator"}


def test_plain_dataloader_is_refused_by_key(tmp_path):
    plain = torch.utils.data.DataLoader(list(range(6)), batch_size=2, shuffle=True)
    with pytest.raises(torchckpt.UnsupportedStateError,
                       match=r"'loader'.*cannot resume mid-epoch.*from torchdata\.stateful_dataloader import "
                             r"StatefulDataLoader") as e:
        torchckpt.Checkpoint(loader=plain).write(tmp_path / "c")
    assert e.value.key == "loader"
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("state", [{"hparams": {"act": torch.nn.ReLU}}, {"hparams": torch.nn.ReLU}],
                         ids=["in-a-dict", "top-level"])
def test_class_in_state_is_refused_by_key(tmp_path, state):
    key = "hparams/act" if isinstance(state["hparams"], dict) else "hparams"
    with pytest.raises(torchckpt.UnsupportedStateError, match=r"the class torch\.nn\.modules\.activation\.ReLU.*"
                                                              r"Store its name instead \(for example 'ReLU'\)") as e:
        torchckpt.Checkpoint(**state).write(tmp_path / "c")
    assert e.value.key == key
    assert e.value.value_type is type


def test_torchdata_is_not_imported_with_torchckpt():
    code = "import sys, torchckpt; sys.exit('torchdata' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_distributed_sampler_inside_a_batch_sampler_keeps_its_epoch_and_split(tmp_path, num_workers):
    """``batch_sampler=BatchSampler(DistributedSampler(...))``: the loader's ``sampler`` is a
    stand-in, so the epoch and the split are the inner sampler's. A resume in the middle of the
    second epoch goes on with that epoch's order (with workers, the resumed iterator fetches its
    indices during the restore, before the training loop's own ``set_epoch``)."""
    from torch.utils.data import BatchSampler
    from torch.utils.data.distributed import DistributedSampler

    data = list(range(12))

    def build(replicas: int = 1, rank: int = 0):
        sampler = DistributedSampler(data, num_replicas=replicas, rank=rank, shuffle=True, seed=7)
        loader = StatefulDataLoader(data, batch_sampler=BatchSampler(sampler, 3, False), num_workers=num_workers,
                                    generator=torch.Generator().manual_seed(0))
        return sampler, loader

    sampler, saving = build()
    sampler.set_epoch(0)
    list(saving)
    sampler.set_epoch(1)
    it = iter(saving)
    next(it)
    path = torchckpt.Checkpoint(loader=saving, epoch=1).write(tmp_path / "c")
    rest = [b.tolist() for b in it]
    sampler, resumed = build()
    ckpt = torchckpt.Checkpoint(loader=resumed, epoch=0)
    ckpt.read(path).assert_consumed()
    sampler.set_epoch(ckpt.epoch)  # as a training loop does
    assert [b.tolist() for b in resumed] == rest
    _, elsewhere = build(replicas=2, rank=1)
    report = torchckpt.Checkpoint(loader=elsewhere, epoch=0).read(path).report
    assert "saved by rank 0 of a sampler split 1 ways" in report.skipped_objects["loader"]


def test_rng_state_is_set_after_a_loader_that_draws_while_it_resumes(tmp_path):
    """torchdata fast-forwards a dataset without ``state_dict`` by iterating it, and the dataset
    draws from the global generator: ``RNGState`` is set after that, whatever order the names
    were given in, so the run's next draws are the uninterrupted run's."""

    class Noisy(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(12):
                yield torch.tensor(float(i)) + torch.rand(())

    for order in (("rng", "loader"), ("loader", "rng")):
        torch.manual_seed(0)
        saving = StatefulDataLoader(Noisy(), batch_size=3, generator=torch.Generator().manual_seed(0))
        it = iter(saving)
        next(it), next(it)
        tracked = {"rng": torchckpt.RNGState(), "loader": saving}
        path = torchckpt.Checkpoint(**{k: tracked[k] for k in order}).write(tmp_path / "-".join(order))
        expected = torch.rand(3)
        torch.manual_seed(999)
        tracked = {"rng": torchckpt.RNGState(),
                   "loader": StatefulDataLoader(Noisy(), batch_size=3, generator=torch.Generator().manual_seed(0))}
        torchckpt.Checkpoint(**{k: tracked[k] for k in order}).read(path).assert_consumed()
        assert torch.equal(torch.rand(3), expected), order


def test_a_loop_an_exception_ended_saved_from_its_handler_resumes_mid_epoch(tmp_path):
    """``except KeyboardInterrupt: save()``: the exception took the loop's iterator with it, as a
    break does, but the epoch was interrupted, not left (probe37 F1: the rest of it was skipped)."""
    def build():
        return StatefulDataLoader(list(range(12)), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))

    whole = [b.tolist() for b in build()]
    first, seen = build(), []
    try:
        for batch in first:
            seen.append(batch.tolist())
            if len(seen) == 2:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        torchckpt.Checkpoint(loader=first).write(tmp_path / "c")
    fresh = build()
    torchckpt.Checkpoint(loader=fresh).read(tmp_path / "c").assert_consumed()
    assert seen + [b.tolist() for b in fresh] == whole


def test_a_sampler_class_of_the_script_run_as_main_matches_the_same_class_imported(tmp_path):
    """A resume script, or ``python -m``, imports the training script's sampler from its module
    (probe36 F4: refused as another order)."""
    class EvenFirst(torch.utils.data.Sampler):
        def __init__(self, data) -> None:
            self.n = len(data)

        def __iter__(self):
            return iter([*range(0, self.n, 2), *range(1, self.n, 2)])

        def __len__(self) -> int:
            return self.n

    as_main = type(EvenFirst.__name__, (EvenFirst,), {"__module__": "__main__", "__qualname__": EvenFirst.__qualname__})
    data = list(range(12))
    saving = StatefulDataLoader(data, batch_size=3, sampler=as_main(data))
    running = iter(saving)
    next(running)
    path = torchckpt.Checkpoint(loader=saving).write(tmp_path / "c")
    resumed = StatefulDataLoader(data, batch_size=3, sampler=EvenFirst(data))
    torchckpt.Checkpoint(loader=resumed).read(path).assert_consumed()
    assert [b.tolist() for b in resumed] == [[6, 8, 10], [1, 3, 5], [7, 9, 11]]


@pytest.mark.parametrize(("saved", "restored", "message"), [
    (dict(shuffle=True), dict(shuffle=False), "saved with samplers torchdata.stateful_dataloader.sampler.RandomSampler"),
    (dict(shuffle=False), dict(shuffle=True), "this loader's are torchdata.stateful_dataloader.sampler.RandomSampler"),
    (dict(sampler="distributed"), dict(shuffle=True), "torch.utils.data.distributed.DistributedSampler (shuffle=True)"),
])
def test_a_position_saved_in_another_order_is_skipped_and_reported(tmp_path, saved, restored, message):
    """A position in another sampler's order means other samples: left as it is, and reported.
    Before, shuffle=False to True (or a DistributedSampler to a shuffled loader) resumed silently,
    repeating and skipping samples (probe35 F2), and True to False was torchdata's AssertionError."""
    data = list(range(20))

    def build(shuffle=False, sampler=None):
        if sampler == "distributed":
            sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=1, rank=0, seed=1)
        return StatefulDataLoader(data, batch_size=3, shuffle=shuffle, sampler=sampler,
                                  generator=torch.Generator().manual_seed(0))

    saving = build(**saved)
    running = iter(saving)
    next(running)
    path = torchckpt.Checkpoint(loader=saving).write(tmp_path / "c")
    report = torchckpt.Checkpoint(loader=build(**restored)).read(path).report
    assert report.missing_keys == ["loader"] and message in report.skipped_objects["loader"], report


@pytest.mark.parametrize(("changed", "message"), [
    (dict(batch_size=4), "saved with batch_size=3, this loader has batch_size=4"),
    (dict(data=list(range(30))), "saved over a dataset of 20 samples, this loader's has 30"),
])
def test_a_position_saved_with_another_batch_size_or_dataset_is_skipped_and_reported(tmp_path, changed, message):
    """A position counts batches of a permutation of the dataset: with another batch size or
    dataset length it would go on from other samples, silently. Left as it is, and reported."""
    def build(data=tuple(range(20)), batch_size=3):
        return StatefulDataLoader(list(data), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))

    saving = build()
    running = iter(saving)  # its loop still running at the save: the position is the one to resume
    next(running)
    path = torchckpt.Checkpoint(loader=saving, step=1).write(tmp_path / "c")
    restoring = build(**changed)
    ckpt = torchckpt.Checkpoint(loader=restoring, step=0)
    report = ckpt.read(path).report
    assert report.missing_keys == ["loader"] and message in report.skipped_objects["loader"]
    assert ckpt.step == 1 and len([b for b in restoring]) == len(build(**changed))  # a whole epoch, from its start
    same = build()
    assert not torchckpt.Checkpoint(loader=same, step=0).read(path).report


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stateful_distributed_sampler_saved_after_its_epoch_goes_on_with_the_next(tmp_path, num_workers):
    """torchdata 0.11 alone carries the finished epoch's count into the next epoch, which then
    yields nothing; the restore gives the next epoch whole, as an uninterrupted run has it."""
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    data = list(range(6))

    def build():
        sampler = StatefulDistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7)
        return sampler, StatefulDataLoader(data, batch_size=2, sampler=sampler, num_workers=num_workers,
                                           generator=torch.Generator().manual_seed(0))

    sampler, saving = build()
    sampler.set_epoch(0)
    list(saving)  # the loop ended, then the save
    path = torchckpt.Checkpoint(loader=saving).write(tmp_path / "c")
    sampler.set_epoch(1)
    expected = [b.tolist() for b in saving]
    sampler, resumed = build()
    torchckpt.Checkpoint(loader=resumed).read(path).assert_consumed()
    sampler.set_epoch(1)
    assert [b.tolist() for b in resumed] == expected and expected


def test_an_iterable_dataset_of_another_length_still_resumes(tmp_path):
    """An iterable dataset has no sampler's order: its position does not depend on its length."""

    class Counting(torch.utils.data.IterableDataset):
        def __init__(self, n: int) -> None:
            self.n = n

        def __iter__(self):
            return iter(range(40))

        def __len__(self) -> int:
            return self.n

    saving = StatefulDataLoader(Counting(20), batch_size=2, generator=torch.Generator().manual_seed(0))
    it = iter(saving)
    next(it), next(it)
    path = torchckpt.Checkpoint(loader=saving).write(tmp_path / "c")
    resumed = StatefulDataLoader(Counting(25), batch_size=2, generator=torch.Generator().manual_seed(0))
    torchckpt.Checkpoint(loader=resumed).read(path).assert_consumed()
    assert next(iter(resumed)).tolist() == [4, 5]
