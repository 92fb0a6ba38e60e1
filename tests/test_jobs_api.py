"""The files and fine-tuning API, driven by the official `openai` client against a server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ServerProcess, wait_for

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def oai(trainer_server):
    return openai.OpenAI(base_url=trainer_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def files(oai, word_data):
    return {key: oai.files.create(file=open(path, "rb"), purpose="fine-tune").id for key, path in word_data.items()}


def finish(oai, job_id: str, timeout: float = 300):
    return wait_for(lambda: (j := oai.fine_tuning.jobs.retrieve(job_id)).status in TERMINAL and j, timeout,
                    interval=0.5, what=f"job {job_id} finished")


def test_files_create_then_job_then_chat_with_the_fine_tuned_model(oai, files, trainer_server):
    job = oai.fine_tuning.jobs.create(
        model="tiny-llama", training_file=files["chat"], suffix="api-soft", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 8}}},
        extra_body={"hotpeft": {"method": "prompt_tuning", "num_virtual_tokens": 8, "eval_max_new_tokens": 8}},
    )
    assert job.status in ("queued", "running") and job.model == "tiny-llama" and job.seed == 7
    assert job.hyperparameters.n_epochs == 4 and job.hyperparameters.batch_size == 8
    job = finish(oai, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "api-soft@1" and job.trained_tokens > 0 and job.finished_at >= job.created_at
    metrics = job.model_extra["hotpeft"]["metrics"]
    assert metrics["adapter"]["loss"] < metrics["base"]["loss"]
    # served at once by the server that trained it, under the job's fine_tuned_model and the bare name
    reply = oai.chat.completions.with_raw_response.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "apple"}], max_tokens=4)
    assert reply.headers["x-hotpeft-adapter"] == "api-soft@1"
    assert reply.parse().choices[0].message.content is not None
    record = httpx.get(f"{trainer_server.url}/v1/adapters/api-soft").json()["versions"][0]
    assert record["kind"] == "prompt_tuning" and record["source_detail"]["job"] == job.id
    # events: newest first, with the training steps as metrics and the completion last
    events = oai.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == "The job has successfully completed"
    steps = [e for e in events if e.type == "metrics"]
    assert steps and steps[0].data["step"] == steps[0].data["total_steps"]
    assert any(e.message.startswith("Created fine-tuning job") for e in events)
    page = oai.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    assert job.id in [j.id for j in oai.fine_tuning.jobs.list(limit=100).data]


def test_cancel_a_running_job_while_the_next_one_waits_queued(oai, files, trainer_server):
    long = oai.fine_tuning.jobs.create(model="base", training_file=files["pairs"], suffix="api-cancelled",
                                       extra_body={"hotpeft": {"max_steps": 100000, "rank": 4}})
    wait_for(lambda: (oai.fine_tuning.jobs.retrieve(long.id).model_extra["hotpeft"]["progress"] or {}).get("step"),
             180, interval=0.5, what="the long job training")
    # training runs in its own process: serving keeps answering meanwhile
    reply = oai.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")
    queued = oai.fine_tuning.jobs.create(model="base", training_file=files["pairs"], suffix="api-after",
                                         extra_body={"hotpeft": {"max_steps": 2, "rank": 4, "eval_max_new_tokens": 4}})
    assert oai.fine_tuning.jobs.retrieve(queued.id).status == "queued"  # one job at a time by default
    cancelled = oai.fine_tuning.jobs.cancel(long.id)
    assert cancelled.status == "cancelled"
    # the worker stops and the queued job runs; it finishing means the cancelled worker is gone
    assert finish(oai, queued.id).status == "succeeded"
    assert oai.fine_tuning.jobs.retrieve(long.id).status == "cancelled"
    assert httpx.get(f"{trainer_server.url}/v1/adapters/api-cancelled").status_code == 404
    assert any(e.message == "Job cancelled" for e in oai.fine_tuning.jobs.list_events(long.id, limit=100).data)
    with pytest.raises(openai.ConflictError, match="already cancelled"):
        oai.fine_tuning.jobs.cancel(long.id)
    with pytest.raises(openai.ConflictError, match="already succeeded"):
        oai.fine_tuning.jobs.cancel(queued.id)


def _upload(oai, tmp_path: Path, content: str, purpose: str = "fine-tune"):
    path = tmp_path / "upload.jsonl"
    path.write_text(content)
    return oai.files.create(file=open(path, "rb"), purpose=purpose)


@pytest.mark.parametrize("content, purpose, match", [
    ('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion"', "fine-tune", r"line 2: not valid JSON"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}\n', "fine-tune", r"line 1: messages\[0\] has unknown role"),
    ('{"prompt": "a"}\n', "fine-tune", r"line 1: 'completion' must be a string"),
    ("", "fine-tune", r"has 0 example\(s\)"),
    ('{"prompt": "a", "completion": " b"}\n', "assistants", r"purpose 'fine-tune' only"),
])
def test_bad_uploads_are_refused_with_the_line_and_stored_nowhere(oai, tmp_path, trainer_server, content, purpose,
                                                                  match):
    before = {f.id for f in oai.files.list().data}
    stored = set(os.listdir(trainer_server.home / "files"))
    with pytest.raises(openai.BadRequestError, match=match) as err:
        _upload(oai, tmp_path, content, purpose)
    assert err.value.body["param"] in ("file", "purpose")
    assert {f.id for f in oai.files.list().data} == before
    assert set(os.listdir(trainer_server.home / "files")) == stored


def test_oversized_upload_is_413(trainer_server):
    # the fixture's server takes files up to 1 MiB
    before = set(os.listdir(trainer_server.home / "files"))
    r = httpx.post(trainer_server.url + "/v1/files", data={"purpose": "fine-tune"},
                   files={"file": ("big.jsonl", b'{"prompt": "a", "completion": " b"}\n' * 60000)}, timeout=30)
    assert r.status_code == 413 and "over --max-file-bytes 1048576" in r.json()["error"]["message"]
    assert set(os.listdir(trainer_server.home / "files")) == before


@pytest.fixture(scope="module")
def one_line_file(oai, tmp_path_factory):
    return _upload(oai, tmp_path_factory.mktemp("one"), '{"prompt": "a", "completion": " b"}\n').id


@pytest.mark.parametrize("kwargs, status, param, match", [
    ({"model": "gpt-4o-mini"}, 400, "model", r"fine-tunes the base model this server serves, 'tiny-llama'"),
    ({"training_file": "file-nope"}, 400, "training_file", r"no such file"),
    ({"training_file": "ONE_LINE"}, 400, "training_file", r"has 1 example\(s\); at least 2"),
    ({"suffix": "Not A Name"}, 400, "suffix", r"suffix: "),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}, 400,
     "method.supervised.hyperparameters.n_epochs", r"must be between 0.01 and 100, got 0"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": -1}}}}, 400,
     "method.supervised.hyperparameters.learning_rate_multiplier", r"must be above 0"),
    ({"method": {"type": "dpo"}}, 400, "method.type", r"'dpo' is not trained by hotpeft"),
    ({"extra_body": {"hotpeft": {"rank": 0}}}, 400, "hotpeft.rank", r"'hotpeft.rank' must be between 1 and 256"),
    ({"extra_body": {"hotpeft": {"rank": 128}}}, 400, "hotpeft.rank", r"above this server's --max-lora-rank 64"),
    ({"extra_body": {"hotpeft": {"method": "full"}}}, 400, "hotpeft.method", r"only compared by .hotpeft train --sweep."),
    ({"extra_body": {"hotpeft": {"retention": "/etc/passwd"}}}, 400, "hotpeft.retention", r"no such file"),
    ({"extra_body": {"hotpeft": {"max_forgetting": -1}}}, 400, "hotpeft.max_forgetting", r"between 0 and 1"),
    ({"extra_body": {"hotpeft": {"max_length": 100000}}}, 400, "hotpeft.max_length", r"beyond the model's context"),
    ({"extra_body": {"hotpeft": {"lora_rank": 8}}}, 400, "hotpeft.lora_rank", r"Unrecognized field 'hotpeft.lora_rank'"),
    ({"extra_body": {"hotpeft": {"name": "x"}}}, 400, "hotpeft.name", r"set it with 'suffix'"),
])
def test_bad_jobs_are_refused_naming_the_field_and_create_nothing(oai, files, one_line_file, kwargs, status, param,
                                                                   match):
    body = {"model": "tiny-llama", "training_file": files["pairs"], **kwargs}
    if body["training_file"] == "ONE_LINE":
        body["training_file"] = one_line_file
    before = [j.id for j in oai.fine_tuning.jobs.list(limit=100).data]
    with pytest.raises(openai.APIStatusError, match=match) as err:
        oai.fine_tuning.jobs.create(**body)
    assert err.value.status_code == status and err.value.body["param"] == param
    assert err.value.body["type"] == "invalid_request_error"
    assert [j.id for j in oai.fine_tuning.jobs.list(limit=100).data] == before


def test_unknown_ids_are_404(oai):
    with pytest.raises(openai.NotFoundError, match="No such fine-tuning job"):
        oai.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.NotFoundError):
        oai.fine_tuning.jobs.list_events("ftjob-nope")
    with pytest.raises(openai.NotFoundError, match="No such file"):
        oai.files.retrieve("file-nope")


def _worker_pids(job_id: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"hotpeft.trainer.jobs.worker" in cmd and job_id.encode() in cmd:
            pids.append(int(proc.name))
    return pids


def test_worker_killed_mid_training_fails_the_job_with_the_reason(tiny_dirs, word_data, tmp_path):
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--dtype", "float32"], tmp_path / "home",
                           env={"HOTPEFT_FAILPOINT": "trainer.step"})
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        f = client.files.create(file=open(word_data["pairs"], "rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="base", training_file=f.id, suffix="killed")
        job = finish(client, job.id)
        assert job.status == "failed" and job.error.code == "worker_died"
        assert "killed by signal SIGKILL" in job.error.message
        assert httpx.get(f"{server.url}/v1/adapters/killed").status_code == 404
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()


def test_server_restart_marks_the_interrupted_job_failed(tiny_dirs, word_data, tmp_path):
    home = tmp_path / "home"
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--dtype", "float32"], home)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    f = client.files.create(file=open(word_data["pairs"], "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="base", training_file=f.id, suffix="interrupted",
                                         extra_body={"hotpeft": {"max_steps": 100000}})
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).model_extra["hotpeft"]["stage"] == "training", 180,
             interval=0.5, what="the job training")
    assert _worker_pids(job.id)
    server.proc.send_signal(signal.SIGKILL)  # no shutdown: the worker must die with its server
    server.proc.wait()
    server.log.close()
    wait_for(lambda: not _worker_pids(job.id), 10, what="the worker gone with its server")
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--dtype", "float32"], home)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        after = client.fine_tuning.jobs.retrieve(job.id)
        assert after.status == "failed" and after.error.code == "interrupted"
        assert "the server restarted while the job was running" in after.error.message
        assert httpx.get(f"{server.url}/v1/adapters/interrupted").status_code == 404
    finally:
        server.stop()


def test_job_metrics_are_json_serialisable(oai, files, trainer_server):
    """Every field a finished job returns is plain JSON (no NaN or Infinity): the openai client and others parse it."""
    job = oai.fine_tuning.jobs.create(model="tiny-llama", training_file=files["pairs"], suffix="json-check",
                                      extra_body={"hotpeft": {"max_steps": 2, "eval_max_new_tokens": 4}})
    job = finish(oai, job.id)
    assert job.status == "succeeded", job.error

    def refuse(constant):
        raise AssertionError(f"{constant} in the job's JSON")

    body = json.loads(httpx.get(f"{trainer_server.url}/v1/fine_tuning/jobs/{job.id}").text, parse_constant=refuse)
    metrics = body["hotpeft"]["metrics"]
    assert metrics["adapter"]["loss"] > 0 and metrics["base"]["loss"] > 0 and metrics["training"]["steps"] == 2
    json.dumps(job.model_dump(), allow_nan=False)
