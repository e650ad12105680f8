"""Prompt extension against a small fake OpenAI-compatible server on loopback."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import sample_video
from sgm.prompt_extend import PromptExtendConfig, check_prompt_extend, clean_reply, extend_prompt

ROOT = Path(__file__).resolve().parents[1]
EXTENDED = "The red circle bounces on the left while the blue square slides right across a pale floor."


class FakeChat(BaseHTTPRequestHandler):
    """``POST /v1/chat/completions``; what it answers is the server's ``mode``."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        mode = self.server.mode
        if mode == "slow":
            time.sleep(3)
        if mode == "http_error":
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "model crashed"}}')
            return
        if mode == "malformed":
            payload = b'{"id": "x", "object": "chat.completion", "choices": []}'
        elif mode == "not_json":
            payload = b"<html>gateway</html>"
        else:
            content = f'"{EXTENDED}"\n' if mode in ("ok", "slow") else ""
            payload = json.dumps(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    ],
                }
            ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


class FakeServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that gave up (the timeout case) leaves a closed socket behind: not an error here."""


@pytest.fixture()
def chat():
    server = FakeServer(("127.0.0.1", 0), FakeChat)
    server.mode, server.requests = "ok", []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def config_for(server, **kw) -> PromptExtendConfig:
    return PromptExtendConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="fake-7b", **kw)


def test_success_sends_the_multi_subject_system_prompt_and_the_key(chat, monkeypatch):
    monkeypatch.setenv("MY_LLM_KEY", "sk-test-123")
    config = config_for(chat, api_key_env="MY_LLM_KEY", words=60)
    result = extend_prompt("the man walks the dog", references=2, config=config)
    assert result == EXTENDED  # quotes and the trailing newline removed
    (request,) = chat.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test-123"
    system, user = request["body"]["messages"]
    assert request["body"]["model"] == "fake-7b"
    assert system["role"] == "system" and "2 reference image(s)" in system["content"]
    assert "about 60 words" in system["content"] and "add no new main subjects" in system["content"]
    assert user == {"role": "user", "content": "the man walks the dog"}


@pytest.mark.parametrize(
    ("mode", "warning"),
    [
        ("slow", "no reply from"),
        ("http_error", "answered HTTP 500"),
        ("malformed", "malformed reply"),
        ("not_json", "malformed reply"),
        ("empty", "malformed reply"),
    ],
)
def test_any_failure_gives_the_original_prompt_and_one_warning(chat, caplog, mode, warning):
    chat.mode = mode
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="sgm.prompt_extend"):
        result = extend_prompt("a cat and a ball", references=1, config=config_for(chat, timeout=1.0))
    assert result == "a cat and a ball"
    (record,) = [r for r in caplog.records if r.name == "sgm.prompt_extend"]
    assert record.levelno == logging.WARNING and warning in record.getMessage()
    assert "\n" not in record.getMessage()
    assert len(chat.requests) == 1  # no retries: the timeout is the whole budget
    if mode == "slow":
        assert time.perf_counter() - start < 2.9  # gave up at the timeout, did not wait for the reply


def test_unreachable_server_and_disabled_extension(caplog):
    with caplog.at_level(logging.WARNING, logger="sgm.prompt_extend"):
        closed = PromptExtendConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout=2)
        assert extend_prompt("a dog", references=1, config=closed) == "a dog"
    assert "cannot reach http://127.0.0.1:9/v1" in caplog.text
    assert extend_prompt("a dog", references=1, config=PromptExtendConfig()) == "a dog"  # off: no request at all


def test_settings_are_checked_and_replies_cleaned():
    check_prompt_extend(PromptExtendConfig())  # off
    with pytest.raises(ValueError, match="prompt_extend.model"):
        check_prompt_extend(PromptExtendConfig(base_url="http://x/v1"))
    with pytest.raises(ValueError, match="prompt_extend.base_url"):
        check_prompt_extend(PromptExtendConfig(base_url="localhost:11434", model="m"))
    with pytest.raises(ValueError, match="prompt_extend.timeout"):
        check_prompt_extend(PromptExtendConfig(base_url="http://x/v1", model="m", timeout=0))
    assert clean_reply("  'a  dog\nruns'  ") == "a dog runs"
    with pytest.raises(ValueError, match="empty"):
        clean_reply('""')
    with pytest.raises(ValueError, match="not text"):
        clean_reply(None)


def test_sample_video_records_the_original_and_the_extended_prompt(chat, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = [
        "--config",
        "configs/sampling/shapes.yaml",
        "num_steps=2",
        f"prompt_extend.base_url=http://127.0.0.1:{chat.server_port}/v1",
        "prompt_extend.model=fake-7b",
        "--prompt",
        "the first object moves left",
        "--ref",
        "assets/kaleido-shapes/examples/heldout_00009_ref1.png",
    ]
    assert sample_video.main([f"output_dir={tmp_path / 'first'}", *argv]) == 0
    (item,) = (tmp_path / "first").iterdir()
    meta = json.loads((item / "meta.json").read_text())
    assert meta["prompt"] == "the first object moves left" and meta["extended_prompt"] == EXTENDED
    assert "1 reference image(s)" in chat.requests[0]["body"]["messages"][0]["content"]
    chat.mode = "http_error"  # a failed extension: the video is made from the original prompt
    assert sample_video.main([f"output_dir={tmp_path / 'second'}", *argv]) == 0
    (item,) = (tmp_path / "second").iterdir()
    meta = json.loads((item / "meta.json").read_text())
    assert meta["prompt"] == "the first object moves left" and meta["extended_prompt"] is None


def test_the_web_page_extends_when_asked_and_records_both_prompts(chat, tmp_path, monkeypatch):
    from PIL import Image

    from sat.config import load_config
    from sgm.pipeline import KaleidoPipeline, SamplingConfig
    from sgm.web import Request, Studio

    monkeypatch.chdir(ROOT)
    config = load_config(
        SamplingConfig,
        ["configs/sampling/shapes.yaml"],
        [
            f"output_dir={tmp_path}",
            f"prompt_extend.base_url=http://127.0.0.1:{chat.server_port}/v1",
            "prompt_extend.model=fake-7b",
        ],
    )
    studio = Studio(KaleidoPipeline.from_config(config, device="cpu"), config)
    reference = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(reference)
    request = Request("a red ball", [str(reference), None, None], ["", "", ""], 96, 96, 9, 2, 4.0, seed=5)
    plain = json.loads((studio.generate(request) / "meta.json").read_text())
    assert plain["extended_prompt"] is None and not chat.requests  # the box unticked: no request
    request.extend = True
    meta = json.loads((studio.generate(request) / "meta.json").read_text())
    assert meta["prompt"] == "a red ball" and meta["extended_prompt"] == EXTENDED
