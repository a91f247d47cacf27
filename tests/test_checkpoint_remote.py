"""Checkpoints in object storage (``checkpoint.dir=s3://...``, any fsspec URL): saved, verified, kept and
resumed as on a local disk, against an S3-compatible server the tests start (moto's, in a thread of this
process: the test extra installs ``moto[server]`` and ``s3fs``); credentials and the endpoint come from the
environment only. A bucket that cannot be written is one line at the check, before any worker starts."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from conftest import FAST, STEPS, assert_same_curve, read_metric, train

from curry_train.checkpoint import dcp, files
from curry_train.config import ConfigError, compose
from curry_train.config.checks import check
from curry_train.config.resume import resolve
from curry_train.pool import Pools

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "curry-checkpoints"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A local S3-compatible server with one bucket; its endpoint and credentials in the environment, as a
    cluster's job would have them (worker processes started after this inherit them)."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_MAX_ATTEMPTS": "2",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    try:
        yield f"s3://{BUCKET}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_fsdp2_saves_to_s3_and_one_process_resumes_it(s3, single_process_curve, tmp_path):
    """fsdp 2 saves every 2 steps into the bucket (in the background), keeping the last 2 and every 4th;
    each is complete and verifies; the step-6 checkpoint resumes in one process, resharded, on the
    reference curve; the same command with ckpt_path=auto continues a one-process run in its own bucket
    directory."""
    location = f"{s3}/fsdp2"
    saves = ["checkpoint.every_n_steps=2", "checkpoint.keep_last=2", "checkpoint.keep_every=4"]
    common = [*FAST, *saves, "checkpoint.async_mode=thread", f"checkpoint.dir={location}"]
    with Pools() as pools:  # started now: its workers inherit the server's environment
        saved = train(pools, [*common, "trainer.max_steps=6", "parallel=fsdp", "trainer.devices=2"], tmp_path / "a")
        assert_same_curve(read_metric(saved), {s: single_process_curve[s] for s in range(6)})
        kept = files.checkpoints_in(location)
        assert [files.step_of(p) for p in kept] == [4, 6] and all(files.verify(p) is None for p in kept)
        assert not (tmp_path / "a" / "checkpoints").exists()
        step6 = f"{location}/{files.checkpoint_name(6)}"
        resumed = train(pools, [*FAST, f"trainer.max_steps={STEPS}", f"ckpt_path={step6}"], tmp_path / "b")
        assert_same_curve(read_metric(resumed), {s: single_process_curve[s] for s in range(6, STEPS)})
        own = [*FAST, "checkpoint.every_n_steps=2", f"checkpoint.dir={s3}/single"]
        train(pools, [*own, "trainer.max_steps=4"], tmp_path / "c")
        again = train(pools, [*own, f"trainer.max_steps={STEPS}", "ckpt_path=auto"], tmp_path / "c")
        assert_same_curve(read_metric(again), single_process_curve)
    assert dcp.saved_step(files.last_checkpoint(tmp_path / "c", f"{s3}/single")) == STEPS


def test_a_bucket_that_cannot_be_written_is_one_line_at_the_check(s3, tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint\.dir=s3://no-such-bucket/x: cannot write there \(.*\bbucket"):
        check(compose(["logger=csv", "checkpoint.dir=s3://no-such-bucket/x"]), env={}, run_dir=tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"checkpoint\.dir=.*a-file/ckpt: cannot write there"):
        check(compose(["logger=csv", f"checkpoint.dir={blocker}/ckpt"]), env={}, run_dir=tmp_path)
    check(compose(["logger=csv", f"checkpoint.dir={s3}/fine"]), env={}, run_dir=tmp_path)  # the probe cleans up
    assert files.place(f"{s3}/fine").fs.find(f"{BUCKET}/fine") == []


def test_an_unreachable_endpoint_is_one_line_at_the_check(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(ConfigError, match=r"checkpoint\.dir=s3://any/x: cannot write there .*AWS_ENDPOINT_URL"):
        check(compose(["logger=csv", "checkpoint.dir=s3://any/x"]), env={}, run_dir=tmp_path)
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_file_url_works_as_a_directory_does(pools, single_process_curve, tmp_path):
    """``file://``: the same fsspec path as object storage (written in place, the manifest last), on disk."""
    location = f"file://{tmp_path / 'store'}"
    common = [*FAST, "checkpoint.every_n_steps=2", f"checkpoint.dir={location}"]
    train(pools, [*common, "trainer.max_steps=4"], tmp_path / "run")
    (first, second) = files.checkpoints_in(location)
    assert [files.step_of(first), files.step_of(second)] == [2, 4] and files.verify(second) is None
    assert sorted(p.name for p in Path(tmp_path / "store").iterdir()) == ["step-00000002", "step-00000004"]
    again = train(pools, [*common, f"trainer.max_steps={STEPS}", "ckpt_path=auto"], tmp_path / "run")
    assert_same_curve(read_metric(again), single_process_curve)


def test_last_finds_the_same_run_in_a_bucket(s3, tmp_path, caplog):
    """``ckpt_path=last`` with ``checkpoint.search_dir`` a bucket prefix: a run of other optimizer settings
    is passed over, and of a run and the run that resumed it, the later is resumed; a prefix without a
    manifest (an interrupted save) is skipped."""
    import torch  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415

    def saved(prefix: str, step: int, overrides=(), resumed_from=None) -> str:
        model = torch.nn.Linear(4, 4)
        config = OmegaConf.to_container(compose(["data.seq_len=64", *overrides]), resolve=True)
        path = f"{s3}/runs/{prefix}/{files.checkpoint_name(step)}"
        optimizers = [torch.optim.AdamW(model.parameters())]
        lineage = {"resumed_from": resumed_from}
        return str(dcp.save(path, model, optimizers, {"global_step": step}, config, lineage=lineage))

    first = saved("first", 4)
    saved("other-lr", 9, ["optim.lr=1e-4"])
    second = saved("second", 6, resumed_from=first)
    interrupted = files.place(f"{s3}/runs/second/{files.checkpoint_name(8)}")
    (interrupted / "__0_0.distcp").write_bytes(b"half")
    cfg = compose(["data.seq_len=64", "ckpt_path=last", f"checkpoint.search_dir={s3}/runs"])
    with caplog.at_level("WARNING"):
        assert resolve(cfg, tmp_path / "new") == second
    assert f"of the run saved in {s3}/runs/second " in caplog.text
    assert files.checkpoints_in(f"{s3}/runs/second") == [files.place(second)]
