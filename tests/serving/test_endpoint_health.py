"""The local/BYOC server's health tells the truth, and it runs one engine per device."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from inference.errors import SettingsError
from inference.serve import make_server
from inference.settings import Settings, check_against

from .conftest import REPO, TINY, Endpoint, start_endpoint, stop_endpoint


def _serve(server) -> Endpoint:
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return Endpoint(process=None, port=server.server_address[1])


def test_ping_is_503_until_the_engines_are_loaded_then_200(engine):
    server = make_server(None, port=0, settings=engine.settings)
    endpoint = _serve(server)
    try:
        status, _, body = endpoint.request("GET", "/ping")
        assert (status, json.loads(body)) == (503, {"status": "loading"})
        status, _, body = endpoint.request("POST", "/invocations", b'{"input": "x"}', {"Content-Type": "application/json"})
        assert status == 503 and json.loads(body)["error"]["type"] == "loading"
        server.start([engine])
        assert endpoint.request("GET", "/ping")[0] == 200
        assert endpoint.post_json({"input": "x"})[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_model_that_cannot_load_ends_the_process_with_status_1():
    """GIVEN a setting the checkpoint rejects WHEN the server starts THEN it binds, answers /ping 503
    while loading, and exits 1 naming the setting: never a server that looks healthy."""
    env = {"JV3_DEVICE": "cpu", "JV3_DEFAULT_DIMENSIONS": "1024"}
    process = subprocess.Popen([sys.executable, "-m", "inference.serve", "--model-dir", str(TINY), "--port", "0"],
                               cwd=REPO, env={**__import__("os").environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = process.stdout.readline()
        assert "listening on" in line
        endpoint = Endpoint(process, int(line.rsplit(":", 1)[1]))
        seen = set()
        while process.poll() is None:
            try:
                seen.add(endpoint.request("GET", "/ping")[0])
            except OSError:
                pass
            time.sleep(0.05)
        assert process.returncode == 1
        assert 200 not in seen
        assert "JV3_DEFAULT_DIMENSIONS=1024 exceeds the model's 64 dimensions" in process.stderr.read()
    finally:
        process.kill()
        process.wait()


def test_a_bad_setting_value_is_the_operators_error_at_start_up():
    done = subprocess.run([sys.executable, "-m", "inference.serve", "--model-dir", str(TINY), "--port", "0"],
                          cwd=REPO, env={**__import__("os").environ, "JV3_REQUEST_TIMEOUT_S": "soon"},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "JV3_REQUEST_TIMEOUT_S='soon' is not a number" in done.stderr
    with pytest.raises(SettingsError, match="JV3_TASKS names classification, which the checkpoint lacks"):
        check_against(Settings.resolve(tasks="retrieval.query,classification", default_task="retrieval.query"),
                      hidden_size=64, tasks=("retrieval.query",))  # fmt: skip
    with pytest.raises(SettingsError, match="JV3_DEVICE='gpu0' is not a device"):
        from inference.engine import serving_devices

        serving_devices("cpu,gpu0")


def test_one_engine_per_device_sharing_one_queue(engine):
    """Two engines (as on a 2-GPU instance), one batcher each on one queue: both serve, every answer exact."""
    from inference.engine import Engine

    second = Engine.load(TINY, settings=engine.settings, device="cpu")
    served_by: dict[int, set[str]] = {id(engine): set(), id(second): set()}
    for e in (engine, second):  # record which batcher thread ran each engine
        e.embed_many = _recording(e.embed_many, served_by[id(e)])
    server = make_server([engine, second], port=0, settings=engine.settings)
    endpoint = _serve(server)
    try:
        texts = [f"text number {i} " * (1 + i % 7) for i in range(12)]
        single = np.array([d["embedding"] for d in endpoint.post_json({"input": texts})[1]["data"]])
        results, errors = {}, []

        def call(i):
            try:
                status, body = endpoint.post_json({"input": [texts[i % len(texts)]]})
                results[i] = (status, body["data"][0]["embedding"])
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4 * len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and all(status == 200 for status, _ in results.values())
        got = np.array([results[i][1] for i in range(4 * len(texts))])
        assert np.allclose(got, np.tile(single, (4, 1)), atol=1e-5)
    finally:
        server.shutdown()
        server.server_close()
        del engine.embed_many  # the session's engine gets its own method back
    assert served_by[id(engine)] == {"jv3-batcher-0"} and served_by[id(second)] == {"jv3-batcher-1"}


def _recording(embed_many, names: set):
    def wrapper(requests):
        names.add(threading.current_thread().name)
        time.sleep(0.01)  # hold the engine a moment, so the queue's next job goes to the other batcher
        return embed_many(requests)

    return wrapper


def test_jv3_device_list_loads_an_engine_per_entry():
    endpoint = start_endpoint(TINY, env={"JV3_DEVICE": "cpu,cpu"})
    try:
        assert endpoint.post_json({"input": "x"})[0] == 200
    finally:
        log = stop_endpoint(endpoint)
    assert "ready: 2 engine(s) on cpu, cpu" in log


def test_a_torchserve_worker_loads_where_torchserve_placed_it():
    """TorchServe passes each worker its GPU in context.system_properties["gpu_id"]; on a machine without
    CUDA (this one) every worker is on the CPU, and an explicit JV3_DEVICE wins over the assignment."""
    import torch

    from inference.engine import serving_devices
    from inference.torchserve import worker_gpu

    class Context:
        def __init__(self, gpu):
            self.system_properties = {"gpu_id": gpu, "model_dir": "/opt/ml/model"}

    assert [worker_gpu(Context(g)) for g in (2, "3", None, -1, "x")] == [2, 3, None, None, None]
    assert worker_gpu(None) is None
    expected = ["cuda:2"] if torch.cuda.is_available() else ["cpu"]
    assert serving_devices("auto", gpu_id=2) == expected
    assert serving_devices("cpu", gpu_id=2) == ["cpu"]
