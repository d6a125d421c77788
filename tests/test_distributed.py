"""Stages on other ranks: 2-3 processes on loopback gloo, started as torchrun starts them
(the same script on every rank, ``RANK``/``WORLD_SIZE``/``MASTER_*`` in the environment).

What each rank runs is in ``distributed_cases.py``; the driving rank saves what is checked
here. The wire format is tested in this process.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import partime_async as pa
from partime_async.checkpoint import load
from partime_async.core.job import NO_GRADIENT
from partime_async.programs.learn import SKIPPED
from partime_async.ranks.device import SENTINELS
from partime_async.ranks.link import RemoteStageError, describe, rebuild
from partime_async.ranks.wire import Decoder, Encoder

CASES = Path(__file__).resolve().parent / "distributed_cases.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(case: str, out: Path, world: int = 2, *, ranks: int | None = None, timeout: float = 90,
           command: list[str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Run ``case`` (or ``command``, a script and its arguments) on ``ranks`` (default: all)
    of a ``world``-process job; their results."""
    port = str(_free_port())
    procs = []
    for rank in range(world if ranks is None else ranks):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, *(command or [str(CASES), case, str(out)])], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    done = []
    try:
        for proc in procs:
            stdout, _ = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout))
    finally:
        for proc in procs:
            proc.kill()
    return done


def result(out: Path) -> dict:
    return torch.load(out / "result.pt", weights_only=False)


def _clean(done: list[subprocess.CompletedProcess[str]]) -> None:
    for rank, proc in enumerate(done):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{proc.stdout[-3000:]}"


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_outputs_equal_the_unsplit_model_in_order(tmp_path, world):
    _clean(launch("exact", tmp_path, world))
    r = result(tmp_path)
    expected = r["expected"]
    assert len(r["streamed"]) == len(expected) == 30
    assert all(torch.equal(a, b) for a, b in zip(r["streamed"], expected, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(r["submitted"], expected[:8], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(r["graph"], expected, strict=True))
    assert r["seqs"] == list(range(30))
    remote = [s for s in r["stats"].stages if s.device.startswith("rank")]
    assert [s.frames for s in remote] == [30] * (world - 1) and all(s.busy_s > 0 for s in remote)
    assert r["devices"] == ["cpu:0", "rank1:cpu", "rank2:cpu"][:world]


def test_distributed_any_module_split_as_a_graph(tmp_path):
    _clean(launch("graph", tmp_path))
    r = result(tmp_path)
    for got, want in zip(r["got"], r["expected"], strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_distributed_shapes_change_along_the_stream(tmp_path):
    _clean(launch("shapes", tmp_path))
    r = result(tmp_path)
    assert [g.shape[0] for g in r["got"]] == [1 + k % 3 for k in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(r["got"], r["expected"], strict=True))


def test_distributed_learning_gives_the_weights_of_one_process(tmp_path):
    _clean(launch("learns", tmp_path))
    r = result(tmp_path)
    for mode in ("partime", "stashed"):
        ranked, local = r[mode]["ranked"], r[mode]["local"]
        for key, value in local["model"].items():
            assert torch.equal(ranked["model"][key], value), (mode, key)
            assert not torch.equal(r[mode]["initial"][key], value), (mode, key)  # every stage learnt
        for got, want in zip(ranked["learners"], local["learners"], strict=True):
            assert got["steps"] == want["steps"] > 0
            for slot, state in want["optimizer"]["state"].items():
                assert torch.equal(got["optimizer"]["state"][slot]["momentum_buffer"], state["momentum_buffer"])
        assert all(torch.equal(a, b) for a, b in zip(r[mode]["outs"], r[mode]["expected"], strict=True))
    for seq in (11, 23):  # checkpoint cuts taken while frames flowed, stage 1's on rank 1
        ranked, local = (load(tmp_path / f"{which}-{seq}.pt") for which in ("ranked", "local"))
        assert ranked["position"] == local["position"] == seq + 1
        assert all(torch.equal(ranked["model"][k], v) for k, v in local["model"].items())
        assert [s["steps"] for s in ranked["learners"]] == [s["steps"] for s in local["learners"]]


def test_distributed_state_saved_on_rank_0_resumes_across_ranks(tmp_path):
    _clean(launch("resumes", tmp_path))
    r = result(tmp_path)
    assert r["ranked"]["position"] == r["local"]["position"] == 24
    assert all(torch.equal(r["ranked"]["model"][k], v) for k, v in r["local"]["model"].items())
    assert [s["steps"] for s in r["ranked"]["learners"]] == [s["steps"] for s in r["local"]["learners"]]


def test_distributed_exception_on_a_remote_stage(tmp_path):
    _clean(launch("remote_error", tmp_path))
    r = result(tmp_path)
    raised = r["raise"]
    assert raised["seqs"] == list(range(7))  # the frames before the failing one, then the error
    assert "stage 1 (rank1:cpu) failed on frame 7: ValueError: bad frame (on rank 1)" in raised["error"]
    assert raised["admitted"] == raised["delivered"] + raised["abandoned"]
    skipped = r["skip"]
    assert skipped["error"] is None and list(skipped["skipped"]) == [7]
    assert skipped["seqs"] == [k for k in range(20) if k != 7]


def test_distributed_killed_rank_stops_the_others_with_its_name(tmp_path):
    done = launch("killed", tmp_path, timeout=60)
    assert done[1].returncode == -9  # the SIGKILL
    assert done[0].returncode == 0, done[0].stdout[-3000:]
    r = result(tmp_path)
    assert "stage 1 (rank1:cpu)" in r["error"] and "rank 1 is lost" in r["error"]
    assert r["seqs"] == list(range(len(r["seqs"]))) and len(r["seqs"]) <= 10


def test_distributed_ctrl_c_on_the_driving_rank_stops_every_rank(tmp_path):
    done = launch("interrupted", tmp_path, timeout=60)
    assert done[0].returncode in (-2, 130) and "KeyboardInterrupt" in done[0].stdout  # Ctrl-C's own exit
    assert done[1].returncode == 0 and (tmp_path / "rank1.done").read_text() == "served"


def test_distributed_link_survives_an_abandoned_run_a_payload_that_cannot_travel_and_idling(tmp_path):
    _clean(launch("survives", tmp_path))
    r = result(tmp_path)
    assert r["abandoned"] == "the reader stops" and r["next_run"] == list(range(10))
    assert r["pairs"] == [] and r["pairs_skipped"] == [0, 1, 2]  # each frame failed, not the link
    assert r["after_idling"] == (1, 32)


def test_distributed_rank_that_never_joins_times_out_clearly(tmp_path):
    done = launch("never_joins", tmp_path, world=2, ranks=1, timeout=60)
    _clean(done)
    error = result(tmp_path)["error"]
    assert "did not all join within 3 s" in error and "torchrun" in error


def test_distributed_outside_torchrun_says_how_to_start(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match=r"not started by torchrun .*`torchrun --nproc-per-node 2"):
        pa.Pipeline(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), devices=["cpu", "rank1:cpu"])


@pytest.mark.parametrize("learn", [False, True])
def test_distributed_example(tmp_path, learn):
    example = Path(__file__).resolve().parents[1] / "examples" / "distributed_stream.py"
    extra = ["--learn", "--save", str(tmp_path / "learnt.pt")] if learn else []
    done = launch("", tmp_path, 3, command=[str(example), "--frames", "12", *extra])
    _clean(done)
    out = done[0].stdout
    assert "rank 0: 12 frames over 3 ranks" in out and "stage 2 (rank2:cpu): 12 frames" in out
    if learn:
        assert "saved to" in out
        state = torch.load(tmp_path / "learnt.pt", weights_only=True)
        assert [learner["steps"] for learner in state["learners"]][-1] > 0
    else:
        assert "outputs equal the unsplit model's: True" in out


# -- the wire, in this process -----------------------------------------------------------------
def _round_trip(payloads):
    encoder, decoder = Encoder(SENTINELS), Decoder(SENTINELS)
    sizes, decoded = [], []
    for p in payloads:
        message = encoder.encode(2, 1, 5, p, busy=0.25)
        sizes.append(message.numel())
        decoded.append(decoder.decode(message))
    return sizes, decoded


def test_distributed_wire_round_trips_pytrees_and_sends_the_layout_only_when_it_changes():
    x = torch.randn(2, 3)
    payloads = [x, x + 1, (7, x, True, None), (8, x, False, None), {"a": [torch.arange(4), 2.5, "s"]},
                (SKIPPED, NO_GRADIENT), torch.randn(3, 4)[:, 1], torch.zeros(0, 3), torch.tensor(1.5)]
    sizes, decoded = _round_trip(payloads)
    assert sizes[1] < sizes[0] and sizes[3] < sizes[2]  # same layout: it does not travel again
    for p, m in zip(payloads, decoded, strict=True):
        assert (m.kind, m.stage, m.seq, m.busy) == (2, 1, 5, 0.25)
        assert torch.utils._pytree.tree_structure(m.payload) == torch.utils._pytree.tree_structure(p)
        for a, b in zip(torch.utils._pytree.tree_leaves(p), torch.utils._pytree.tree_leaves(m.payload), strict=True):
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(a, b)
            else:
                assert a is b or a == b
    assert decoded[5].payload[0] is SKIPPED and decoded[5].payload[1] is NO_GRADIENT


class Mine:
    """An object of a user's: it may travel pickled, but is never unpickled from a peer."""


def test_distributed_wire_pickles_other_payloads_and_reads_them_weights_only():
    state = {"param_groups": [{"lr": 0.1, "params": [0, 1]}], "dtype": torch.float16}
    _, (m,) = _round_trip([state])
    assert m.payload == state
    encoder = Encoder(SENTINELS)
    message = encoder.encode(2, 0, 0, Mine())  # pickled: reading it is refused
    with pytest.raises(Exception, match=r"weights_only|Unsupported global"):
        Decoder(SENTINELS).decode(message)


def test_distributed_errors_cross_as_their_own_type():
    error = rebuild(describe(ValueError("no")), 1, None)
    assert type(error) is ValueError and str(error) == "no (on rank 1)"
    frame = rebuild(describe(pa.FrameError("bad shape", component="stage 1 (cpu:0) output", seq=3)), 1, None)
    assert isinstance(frame, pa.FrameError) and frame.seq == 3 and "bad shape (on rank 1)" in str(frame)

    class Custom(Exception):
        pass

    other = rebuild(describe(Custom("odd")), 2, None)
    assert isinstance(other, RemoteStageError) and "Custom: odd (on rank 2)" in str(other)


def test_distributed_wire_sends_conjugate_views_big_ints_and_copies_small_messages_out():
    z = torch.randn(3, dtype=torch.complex64)
    _, (conj, big) = _round_trip([z.conj(), (2**70, -(2**63))])
    assert torch.equal(conj.payload, z.conj().resolve_conj())
    assert big.payload == (2**70, -(2**63))
    encoder, decoder = Encoder(SENTINELS), Decoder(SENTINELS)
    message = encoder.encode(2, 0, 0, torch.arange(4.0))
    buffer = torch.zeros(64 * 1024, dtype=torch.uint8)  # a receive buffer, much bigger than the message
    buffer[:message.numel()] = message
    out = decoder.decode(buffer).payload
    assert torch.equal(out, torch.arange(4.0)) and out.untyped_storage().nbytes() == 16  # not the buffer


def test_distributed_wire_a_payload_that_cannot_be_read_fails_its_frame_not_the_link():
    from partime_async.ranks.link import ERROR, _undecodable

    encoder, decoder = Encoder(SENTINELS), Decoder(SENTINELS, undecodable=_undecodable)
    refused = decoder.decode(encoder.encode(2, 1, 7, Mine()))
    assert (refused.kind, refused.stage, refused.seq) == (ERROR, 1, 7)
    assert "cannot travel between ranks" in str(rebuild(refused.payload, 0, None))
    assert torch.equal(decoder.decode(encoder.encode(2, 1, 8, torch.ones(2))).payload, torch.ones(2))
