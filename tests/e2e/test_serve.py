"""`rewardctl serve` on a real loopback socket, called with a real HTTP client (urllib): its rewards
equal `rewardctl score`'s, concurrent requests share a model pass, bad bodies get a 4xx and the server
keeps serving."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from rewardctl.score import score_rows

from ..conftest import SAMPLES, compose_score, optional_module, read_jsonl, run_training, write_jsonl


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    optional_module("fastapi", "serve")
    optional_module("uvicorn", "serve")
    _, run_dir = run_training(tmp_path_factory.mktemp("serve"), ["train.max_steps=2", "data.max_eval_rows=16"])
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "rewardctl", "serve", f"run_dir={run_dir}", f"port={port}", "max_wait_ms=300"],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {log_path.read_text()}")
        try:
            if call(f"{url}/health")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the server did not start within 180 s")
    yield url, run_dir
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def expected(server: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[float]]:
    """Texts (prompt + chosen answer, as /get_reward receives them) and `rewardctl score`'s rewards."""
    _, run_dir = server
    rows = read_jsonl(SAMPLES / "pairwise" / "eval.jsonl")[:6]
    texts = [r["prompt"] + r["chosen"] for r in rows]
    folder = tmp_path_factory.mktemp("expected")
    source = write_jsonl(folder / "texts.jsonl", [{"response": t} for t in texts])
    score_rows(compose_score([f"run_dir={run_dir}", f"dataset={source}", f"output={folder / 'out.jsonl'}"]))
    return texts, [r["reward"] for r in read_jsonl(folder / "out.jsonl")]


def test_score_and_get_reward_equal_rewardctl_score(server, expected):
    url, run_dir = server
    texts, rewards = expected
    status, reply = call(f"{url}/score", {"texts": texts})
    assert status == 200 and reply["rewards"] == pytest.approx(rewards, abs=1e-5)
    status, reply = call(f"{url}/get_reward", {"query": texts})  # OpenRLHF's remote reward model
    assert status == 200 and reply["rewards"] == pytest.approx(rewards, abs=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")  # decoded sequences keep BOS, EOS and padding
    decorated = [
        tokenizer.pad_token * 2 + (tokenizer.bos_token or "") + t + tokenizer.eos_token + tokenizer.pad_token
        for t in texts
    ]
    status, reply = call(f"{url}/get_reward", {"query": decorated})
    assert status == 200 and reply["rewards"] == pytest.approx(rewards, abs=1e-5)
    stats = json.loads((run_dir / "model" / "config.json").read_text())["rewardctl"]
    status, reply = call(f"{url}/score", {"texts": texts, "normalize": True})
    normalized = [(r - stats["reward_mean"]) / stats["reward_std"] for r in rewards]
    assert status == 200 and reply["rewards"] == pytest.approx(normalized, abs=1e-4)
    status, reply = call(
        f"{url}/score", {"rows": [{"prompt": "User: hi\nAssistant:", "chosen": " Hello!", "rejected": " No."}]}
    )
    assert status == 200 and set(reply["scores"][0]) == {"chosen_reward", "rejected_reward"}
    status, info = call(f"{url}/info")
    budget = OmegaConf.load(run_dir / "config.yaml").model.max_length
    assert status == 200 and info["method"] == "pairwise" and info["max_length"] == budget
    assert info["normalization"] == {"reward_mean": stats["reward_mean"], "reward_std": stats["reward_std"]}


def test_concurrent_requests_share_model_passes(server, expected):
    url, _ = server
    texts, rewards = expected
    before = call(f"{url}/info")[1]["served"]
    with ThreadPoolExecutor(max_workers=6) as pool:
        replies = list(pool.map(lambda t: call(f"{url}/score", {"texts": [t]}), texts))
    assert [r[1]["rewards"][0] for r in replies] == pytest.approx(rewards, abs=1e-5)
    after = call(f"{url}/info")[1]["served"]
    assert after["requests"] - before["requests"] == 6
    assert after["batches"] - before["batches"] < 6  # requests within max_wait_ms shared a pass


def test_bad_bodies_get_a_4xx_and_the_server_keeps_serving(server, expected):
    url, _ = server
    texts, rewards = expected
    assert call(f"{url}/score", b"{not json")[0] == 400
    assert call(f"{url}/score", {"nothing": 1}) == (
        400,
        {"error": "the body needs one of 'texts', 'messages' or 'rows'"},
    )
    assert call(f"{url}/get_reward", {"query": "one string"})[0] == 400
    assert call(f"{url}/score", {"texts": []})[0] == 400
    assert call(f"{url}/score", {"texts": ["x"] * 2000})[0] == 413
    status, reply = call(f"{url}/score", {"rows": [{"response": "fine"}, {"response": 7}]})
    assert status == 400 and "row 2, field 'response'" in reply["error"]
    # a bad request batched with good ones fails alone
    bodies = [{"texts": [texts[0]]}, {"rows": [{"response": 7}]}, {"texts": [texts[1]]}]
    before = call(f"{url}/info")[1]["served"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        replies = list(pool.map(lambda b: call(f"{url}/score", b), bodies))
    assert [r[0] for r in replies] == [200, 400, 200]
    after = call(f"{url}/info")[1]["served"]
    # one shared pass that failed, then one pass per request: more passes than requests shows the batch
    assert after["requests"] - before["requests"] == 3 and after["batches"] - before["batches"] > 3
    assert [replies[0][1]["rewards"][0], replies[2][1]["rewards"][0]] == pytest.approx(rewards[:2], abs=1e-5)
    assert call(f"{url}/health") == (200, {"status": "ok"})
