"""``visor serve`` end to end: the official ``openai`` client against a server started here on loopback.

One tiny VISOR checkpoint (6 layers, 2 SA slots, benchmark tokenizer), one server in a thread on a random
free port of 127.0.0.1. Completions and streams are compared with direct ``model.generate`` on the same
prompt and settings; every kind of bad input must get a 4xx OpenAI-style error while the server keeps
serving; concurrent requests must be batched (fewer ``generate`` calls than requests).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import openai  # the test extra installs it (and the serve extra: fastapi, uvicorn)
import uvicorn

from tests.tiny import random_image, tiny_benchmark_llava, tiny_image_processor
from visor.cli.main import main
from visor.cost import Geometry, count_prefill

N_LAYERS = 6
QUESTION = "What colour is the largest shape?"
MAX_IMAGE_PIXELS = 150 * 150
MAX_PROMPT_TOKENS = 400
MAX_REQUEST_BYTES = 1024 * 1024


class ServerThread:
    """uvicorn in a daemon thread on a socket bound here (so the port is known and free)."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from visor.model.modeling import VisorForConditionalGeneration
    from visor.processing.processor import VisorProcessor
    from visor.serve.app import build_app
    from visor.serve.inputs import Limits

    root = tmp_path_factory.mktemp("serve")
    llava, tok, config = tiny_benchmark_llava(N_LAYERS, seed=0)
    llava_dir, visor_dir = root / "llava", root / "visor"
    llava.save_pretrained(str(llava_dir))
    tok.save_pretrained(str(llava_dir))
    tiny_image_processor(config).save_pretrained(str(llava_dir))
    assert main(["convert", str(llava_dir), str(visor_dir)]) == 0

    images = root / "images"
    images.mkdir()
    outside = root / "outside"
    outside.mkdir()
    pics = {name: random_image(h, w, seed=s) for name, (h, w, s) in
            {"a": (40, 56, 1), "b": (64, 48, 2), "c": (32, 32, 3), "big": (200, 200, 4)}.items()}
    for name, im in pics.items():
        im.save(images / f"{name}.png")
    pics["a"].save(outside / "a.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (images / "notes.txt").write_text("hello")

    limits = Limits(allowed_image_dirs=(images.resolve(),), max_image_pixels=MAX_IMAGE_PIXELS,
                    max_prompt_tokens=MAX_PROMPT_TOKENS, max_tokens_limit=64)
    app = build_app(str(visor_dir), model_name="visor-tiny", limits=limits, max_batch=8, batch_wait_ms=150,
                    max_queue=64, max_request_bytes=MAX_REQUEST_BYTES)
    model = VisorForConditionalGeneration.from_pretrained(str(visor_dir)).eval()
    processor = VisorProcessor.from_pretrained(str(visor_dir))
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield {"root": root, "images": images, "outside": outside, "pics": pics, "server": server, "app": app,
               "client": client, "model": model, "processor": processor, "config": config, "visor_dir": visor_dir}


def user_message(image_url: str | None, question: str = QUESTION) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


def direct(work, image, question: str, config, max_new: int, resolution: str = "full", **sampling) -> dict:
    """What the model generates for this prompt without the server (the documented Python API)."""
    model, processor = work["model"], work["processor"]
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = processor.chat_prompt(question, num_images=1 if image is not None else 0)
    inputs = processor(prompt, [image] if image is not None else None, resolution=resolution)
    out = model.generate(**inputs, active_sa=config, max_new_tokens=max_new, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id, **sampling)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    finish = "length"
    if eos in tokens:
        tokens, finish = tokens[: tokens.index(eos) + 1], "stop"
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_prompt = inputs["input_ids"].shape[1]
    return {"text": tok.decode(tokens, skip_special_tokens=True), "tokens": len(tokens), "finish": finish,
            "prompt_tokens": n_prompt, "visual_tokens": n_visual, "text_tokens": n_prompt - n_visual}


def health(work) -> dict:
    return httpx.get(work["server"].url + "/health", timeout=30).json()


# ---------------------------------------------------------------------- basics
def test_models_health_and_openapi(work):
    models = work["client"].models.list()
    assert [m.id for m in models.data] == ["visor-tiny"]
    assert work["client"].models.retrieve("visor-tiny").id == "visor-tiny"
    h = health(work)
    assert h["status"] == "ok" and h["model"] == "visor-tiny" and "forward_passes" in h["stats"]
    schema = httpx.get(work["server"].url + "/openapi.json", timeout=30).json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/models" in schema["paths"] and "/health" in schema["paths"]
    assert "VisorOptions" in schema["components"]["schemas"]
    assert set(schema["components"]["schemas"]["VisorOptions"]["properties"]) == {"active_sa", "sa_count", "route",
                                                                                  "budget", "reduce"}


def test_cli_registers_serve(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--allowed-image-dir" in out and "--max-batch" in out and "--batch-wait-ms" in out


# ---------------------------------------------------------------------- correctness
@pytest.mark.parametrize("visor_field,config", [({"active_sa": "1"}, (1,)), ({"active_sa": [0, 1]}, (0, 1)),
                                                ({"sa_count": 0}, ()), (None, (0, 1))])
def test_completion_equals_direct_generation(work, visor_field, config):
    image = work["pics"]["a"]
    extra = {"visor": visor_field} if visor_field is not None else None
    response = work["client"].chat.completions.create(
        model="visor-tiny", messages=user_message(data_url(image)), max_tokens=6, extra_body=extra)
    want = direct(work, image, QUESTION, config, 6)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want["text"]
    assert choice.finish_reason == want["finish"]
    usage = response.usage
    assert usage.prompt_tokens == want["prompt_tokens"]
    assert usage.completion_tokens == want["tokens"]
    assert usage.total_tokens == want["prompt_tokens"] + want["tokens"]
    extra_usage = usage.model_extra
    assert extra_usage["visual_tokens"] == want["visual_tokens"] > 0
    geometry = Geometry.from_config(work["model"].config)
    expected = count_prefill(geometry, work["model"].plan, config, want["visual_tokens"], want["text_tokens"]).llm_total
    assert extra_usage["llm_flops"] == pytest.approx(expected)
    assert response.model_extra["visor"]["active_sa"] == ("+".join(map(str, config)) or "none")


def test_flops_follow_the_configuration(work):
    url = data_url(work["pics"]["b"])
    flops = {}
    for k in (0, 1, 2):
        r = work["client"].chat.completions.create(model="visor-tiny", messages=user_message(url), max_tokens=2,
                                                   extra_body={"visor": {"sa_count": k}})
        flops[k] = r.usage.model_extra["llm_flops"]
    assert flops[0] < flops[1] < flops[2]


def test_local_path_and_file_url_equal_data_url(work):
    client = work["client"]
    path = work["images"] / "b.png"
    answers = []
    for url in (data_url(work["pics"]["b"]), str(path), path.as_uri()):
        r = client.chat.completions.create(model="visor-tiny", messages=user_message(url), max_tokens=5,
                                           extra_body={"visor": {"active_sa": "0"}})
        answers.append((r.choices[0].message.content, r.usage.prompt_tokens))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == direct(work, work["pics"]["b"], QUESTION, (0,), 5)["text"]


def test_text_only_and_multi_turn(work):
    client = work["client"]
    r = client.chat.completions.create(model="visor-tiny", max_tokens=4,
                                       messages=[{"role": "system", "content": "Answer briefly."},
                                                 {"role": "user", "content": "Say hi."}])
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.model_extra["visual_tokens"] == 0
    r = client.chat.completions.create(model="visor-tiny", max_tokens=4, messages=[
        *user_message(data_url(work["pics"]["c"])), {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Are you sure?"}])
    assert r.usage.model_extra["visual_tokens"] > 0


def test_stream_equals_completion(work):
    client = work["client"]
    url = data_url(work["pics"]["a"])
    kwargs = dict(model="visor-tiny", messages=user_message(url), max_tokens=8,
                  extra_body={"visor": {"active_sa": "0+1"}})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == direct(work, work["pics"]["a"], QUESTION, (0, 1), 8)["text"]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.model_extra["llm_flops"] == whole.usage.model_extra["llm_flops"]
    assert len({c.id for c in chunks}) == 1
    # the raw stream: SSE 'data:' lines ending with [DONE]
    with httpx.stream("POST", work["server"].url + "/v1/chat/completions", timeout=60,
                      json={"model": "visor-tiny", "messages": user_message(url), "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_sampling_with_seed_equals_direct(work):
    image = work["pics"]["c"]
    r = work["client"].chat.completions.create(
        model="visor-tiny", messages=user_message(data_url(image)), max_tokens=6, temperature=0.9, top_p=0.95,
        seed=1234, extra_body={"top_k": 20, "visor": {"active_sa": "1"}})
    want = direct(work, image, QUESTION, (1,), 6, do_sample=True, temperature=0.9, top_p=0.95, top_k=20,
                  generator=torch.Generator().manual_seed(1234))
    assert r.choices[0].message.content == want["text"]


def test_stop_strings(work):
    client = work["client"]
    url = data_url(work["pics"]["a"])
    base = dict(model="visor-tiny", messages=user_message(url), extra_body={"visor": {"active_sa": "0"}})
    full = client.chat.completions.create(max_tokens=12, **base).choices[0].message.content
    assert len(full) >= 4, full
    stop = full[2:4]
    cut = full[: full.find(stop)]
    r = client.chat.completions.create(max_tokens=12, stop=[stop], **base)
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(max_tokens=12, stop=stop, stream=True, **base) if c.choices)
    assert streamed == cut


# ---------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched(work):
    """12 concurrent requests, two configurations: every answer equals direct generation, and the
    server ran fewer generate calls (and forward passes) than requests."""
    client = work["client"]
    names = ["a", "b", "c"]
    jobs = [(names[i % 3], "0" if i % 2 else "1", 4) for i in range(12)]
    expected = {(n, c): direct(work, work["pics"][n], QUESTION, (int(c),), 4)["text"] for n in names for c in ("0", "1")}
    before = health(work)["stats"]

    def ask(job):
        name, config, max_new = job
        r = client.chat.completions.create(model="visor-tiny", messages=user_message(str(work["images"] / f"{name}.png")),
                                           max_tokens=max_new, extra_body={"visor": {"active_sa": config}})
        return r.choices[0].message.content, r.model_extra["visor"]

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, jobs))
    after = health(work)["stats"]
    for (name, config, _), (text, info) in zip(jobs, answers):
        assert text == expected[(name, config)]
        assert info["active_sa"] == config
    served = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert served == 12
    assert batches < served, after
    assert after["max_batch_size"] > 1
    assert max(info["batch_size"] for _, info in answers) > 1
    # one prefill + at most 4 decode steps per batch: fewer forward passes than 12 requests x 5
    assert after["forward_passes"] - before["forward_passes"] < 12 * 5


# ---------------------------------------------------------------------- routing wiring
def test_route_without_router_is_a_clear_400(work):
    for field in ({"route": True}, {"budget": 0.5}):
        r = httpx.post(work["server"].url + "/v1/chat/completions", timeout=60, json={
            "model": "visor-tiny", "messages": user_message(data_url(work["pics"]["a"])), "visor": field})
        assert r.status_code == 400
        error = r.json()["error"]
        assert "no router" in error["message"] and error["param"].startswith("visor.")


def test_route_uses_the_routers_choice(work, monkeypatch):
    """With a router (faked: config.router set, model.route choosing slot 1 for every row), a routed
    request runs the router's configuration and reports it and its FLOPs."""
    import visor.serve.batching as batching

    served = work["app"].state.engine.model
    calls = []

    def fake_route(input_ids, attention_mask, image_features=None, batch_num_images=None, budget=0.0):
        calls.append(budget)
        return [(1,)] * input_ids.shape[0]

    monkeypatch.setattr(served.config, "router", {"configs": [[1]]}, raising=False)
    monkeypatch.setattr(served, "route", fake_route, raising=False)
    monkeypatch.setattr(batching, "_router_flops", lambda model, n_visual, n_text: 0.0)
    image = work["pics"]["b"]
    r = work["client"].chat.completions.create(model="visor-tiny", messages=user_message(data_url(image)), max_tokens=5,
                                               extra_body={"visor": {"route": True, "budget": 0.25}})
    assert calls == [0.25]
    assert r.model_extra["visor"]["active_sa"] == "1" and r.model_extra["visor"]["route"] is True
    want = direct(work, image, QUESTION, (1,), 5)
    assert r.choices[0].message.content == want["text"]
    geometry = Geometry.from_config(work["model"].config)
    expected = count_prefill(geometry, work["model"].plan, (1,), want["visual_tokens"], want["text_tokens"]).llm_total
    assert r.usage.model_extra["llm_flops"] == pytest.approx(expected)
    r = httpx.post(work["server"].url + "/v1/chat/completions", timeout=60, json={
        "model": "visor-tiny", "messages": user_message(data_url(image)), "visor": {"route": True, "active_sa": "0"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "visor.route"


def test_route_on_request_runs_the_chosen_resolution(work):
    """A router that also picks the resolution (issue 10): the server routes on the base view, encodes the
    tiles only for requests routed to full resolution, and reports the resolution, the slots and the cost."""
    from visor.model.resolution import BASE, FULL, Configuration
    from visor.routing.router import attach_router

    served = work["app"].state.engine.model
    plan = served.plan
    attach_router(served, [Configuration((), BASE), Configuration(plan.all_slots, FULL)])
    try:
        image = work["pics"]["a"]  # 40 x 56: base view + tiles at full resolution, base view not reusable
        geometry = Geometry.from_config(served.config)
        for budget, resolution, config in ((1e6, BASE, ()), (-1e6, FULL, plan.all_slots)):
            before = health(work)["stats"]
            r = work["client"].chat.completions.create(model="visor-tiny", messages=user_message(data_url(image)),
                                                       max_tokens=5, extra_body={"visor": {"budget": budget}})
            info = r.model_extra["visor"]
            assert info["resolution"] == resolution and info["active_sa"] == ("+".join(map(str, config)) or "none")
            want = direct(work, image, QUESTION, config, 5, resolution=resolution)
            assert r.choices[0].message.content == want["text"]
            assert r.usage.model_extra["visual_tokens"] == want["visual_tokens"]
            chosen = count_prefill(geometry, plan, config, want["visual_tokens"], want["text_tokens"])
            assert r.usage.model_extra["llm_flops"] > chosen.llm_total  # plus the routing pass
            one_crop = count_prefill(geometry, plan, (), want["visual_tokens"], want["text_tokens"], n_crops=1)
            per_crop = one_crop.vision_encoder + one_crop.projector
            if resolution == BASE:
                assert info["vision_flops"] == pytest.approx(per_crop)  # the base view only: no tile encoded
            else:
                # the base view for routing, then the full layout (base view again: non-square pixels differ, + tiles)
                from visor.model.vision import num_crops

                cfg = served.config
                full = num_crops([image.height, image.width], cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                assert full > 2 and info["vision_flops"] == pytest.approx(per_crop * (1 + full))
            assert health(work)["stats"]["batches"] == before["batches"] + 1
    finally:
        del served.router
        served.config.router = None


# ---------------------------------------------------------------------- bad input
def _bad_cases(work) -> list[tuple[str, dict, int, str | None]]:
    """(name, request kwargs for httpx.post, expected status, expected error code or None)."""
    ok_url = data_url(work["pics"]["a"])

    def body(**overrides):
        b = {"model": "visor-tiny", "messages": user_message(ok_url), "max_tokens": 2}
        b.update(overrides)
        return {"json": b}

    def with_image(url):
        return body(messages=user_message(url))

    garbage = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nthis is not a png").decode()
    long_question = "word " * 120  # > MAX_PROMPT_TOKENS tokens with the benchmark tokenizer
    return [
        ("malformed JSON", {"content": b'{"model": "visor-tiny", "messages": [', "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ("body not an object", {"json": ["hello"]}, 400, None),
        ("missing messages", {"json": {"model": "visor-tiny"}}, 400, None),
        ("empty messages", body(messages=[]), 400, None),
        ("bad role", body(messages=[{"role": "robot", "content": "hi"}]), 400, None),
        ("missing image file", with_image(str(work["images"] / "nope.png")), 400, "image_not_found"),
        ("undecodable image file", with_image(str(work["images"] / "corrupt.png")), 400, "invalid_image"),
        ("text file as image", with_image(str(work["images"] / "notes.txt")), 400, "invalid_image"),
        ("undecodable data URL", with_image(garbage), 400, "invalid_image"),
        ("bad base64", with_image("data:image/png;base64,@@@not-base64@@@"), 400, "invalid_image_url"),
        ("non-image data URL", with_image("data:text/plain;base64," + base64.b64encode(b"hi").decode()), 400, "invalid_image_url"),
        ("path outside allowed", with_image(str(work["outside"] / "a.png")), 400, "image_path_not_allowed"),
        ("dot-dot escape", with_image(str(work["images"] / ".." / "outside" / "a.png")), 400, "image_path_not_allowed"),
        ("file URL outside", with_image((work["outside"] / "a.png").as_uri()), 400, "image_path_not_allowed"),
        ("relative path", with_image("images/a.png"), 400, "image_path_not_allowed"),
        ("http URL", with_image("http://127.0.0.1:9/a.png"), 400, "network_image_url"),
        ("https URL", with_image("https://example.com/a.png"), 400, "network_image_url"),
        ("other scheme", with_image("s3://bucket/a.png"), 400, "invalid_image_url"),
        ("oversized image", with_image(data_url(work["pics"]["big"])), 400, "image_too_large"),
        ("oversized image file", with_image(str(work["images"] / "big.png")), 400, "image_too_large"),
        ("too many prompt tokens", body(messages=user_message(ok_url, long_question)), 400, "context_length_exceeded"),
        ("max_tokens over the limit", body(max_tokens=10_000), 400, "invalid_value"),
        ("max_tokens zero", body(max_tokens=0), 400, None),
        ("request body too large", {"content": b"x" * (MAX_REQUEST_BYTES + 10), "headers": {"content-type": "application/json"}}, 413, "request_too_large"),
        ("unknown model", body(model="gpt-4o"), 404, "model_not_found"),
        ("visor: slot out of range", body(visor={"active_sa": "0+7"}), 400, "invalid_visor_option"),
        ("visor: unparsable slots", body(visor={"active_sa": "first"}), 400, "invalid_visor_option"),
        ("visor: slot listed twice", body(visor={"active_sa": [1, 1]}), 400, "invalid_visor_option"),
        ("visor: sa_count too big", body(visor={"sa_count": 5}), 400, "invalid_visor_option"),
        ("visor: sa_count negative", body(visor={"sa_count": -1}), 400, "invalid_visor_option"),
        ("visor: both active_sa and sa_count", body(visor={"active_sa": "0", "sa_count": 1}), 400, "invalid_visor_option"),
        ("visor: route not a bool", body(visor={"route": "maybe"}), 400, "invalid_visor_option"),
        ("visor: unknown reducer", body(visor={"reduce": "shrinkify:2x"}), 400, "invalid_visor_option"),
        ("visor: bad reducer amount", body(visor={"reduce": "pooling:lots"}), 400, "invalid_visor_option"),
        ("visor: unknown key", body(visor={"sa_layers": [1]}), 400, "invalid_visor_option"),
        ("visor: not an object", body(visor="fast"), 400, "invalid_visor_option"),
        ("n > 1", body(n=2), 400, "unsupported_value"),
        ("image in a system message", body(messages=[{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": ok_url}}]}, {"role": "user", "content": "hi"}]), 400, "invalid_value"),
        ("image placeholder in text", body(messages=user_message(ok_url, "look <image> here")), 400, "invalid_value"),
        ("image part without url", body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "invalid_value"),
    ]


def test_bad_input_gets_4xx_and_the_server_keeps_serving(work):
    url = work["server"].url + "/v1/chat/completions"
    failures = []
    with httpx.Client(timeout=60) as http:
        for name, kwargs, status, code in _bad_cases(work):
            r = http.post(url, **kwargs)
            try:
                error = r.json()["error"]
                ok = (r.status_code == status and set(error) == {"message", "type", "param", "code"}
                      and isinstance(error["message"], str) and len(error["message"]) > 10
                      and error["type"] == "invalid_request_error" and (code is None or error["code"] == code))
            except (ValueError, KeyError, TypeError):
                ok, error = False, r.text
            if not ok:
                failures.append(f"{name}: {r.status_code} {error}")
            assert http.get(work["server"].url + "/health").json()["status"] == "ok"
        assert not failures, "\n".join(failures)
        # unknown routes and methods are OpenAI-shaped too
        r = http.get(work["server"].url + "/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()
        r = http.get(url)
        assert r.status_code == 405 and "error" in r.json()
    # the openai client raises its typed errors with the server's message
    with pytest.raises(openai.BadRequestError, match="outside the folders"):
        work["client"].chat.completions.create(model="visor-tiny", messages=user_message(str(work["outside"] / "a.png")))
    with pytest.raises(openai.NotFoundError):
        work["client"].chat.completions.create(model="nope", messages=user_message(None, "hi"))
    # and a good request still gets its answer
    image = work["pics"]["c"]
    r = work["client"].chat.completions.create(model="visor-tiny", messages=user_message(data_url(image)), max_tokens=3,
                                               extra_body={"visor": {"active_sa": "0"}})
    assert r.choices[0].message.content == direct(work, image, QUESTION, (0,), 3)["text"]
    assert health(work)["stats"]["failed_requests"] == 0
