"""`python -m dpo.demo`: the page, the JSON endpoint, the plots, and a real browser using it as a person would.

The browser test needs Debian's chromium and chromium-driver and selenium (`bash scripts/install_browser.sh`);
without them it is skipped. For the README, `DEMO_SCREENSHOT=path/demo.png` makes it save its screenshots
there too (the Generate tab after a generation, and the Plots tab as `path/demo_plots.png`), and
`DEMO_RUN_DIR=runs/toy_dpo` shows that run (a toy run of the tiny model, with its plots) instead of a fresh
tiny one that has learnt nearly nothing:

    DEMO_RUN_DIR=runs/toy_dpo DEMO_SCREENSHOT=docs/demo.png python -m pytest -q tests/test_demo.py -k browser
"""

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Optional

import pytest
import torch

from test_train import REPO, quick, train_script
from dpo.data import dataset_source
from dpo.data.toy import toy_prompt
from dpo.generate import GenerationOptions, load_side_by_side

pytest.importorskip("flask", reason='the demo needs Flask: pip install -e ".[demo]"')

from markupsafe import escape  # noqa: E402  (as the page's templates escape)

from dpo.demo import DemoTask, create_app, judged_task, list_plots, main  # noqa: E402

INSTALL_HINT = "run scripts/install_browser.sh"
PROMPT = toy_prompt("bdfh")
OPTIONS = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "greedy": False, "seed": 0}


def write_png(path: Path, width: int = 96, height: int = 64) -> None:
    """A small valid RGB PNG (a colour gradient), written with no imaging library."""
    rows = b"".join(b"\x00" + bytes(channel for x in range(width) for channel in (2 * x, 3 * y, 160))
                    for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny SFT run from scratch (policy: its LATEST, reference: the fresh init) with a plot of our own; or,
    for a README screenshot worth looking at, $DEMO_RUN_DIR: a toy run of the tiny model with its plots, as it is."""
    if os.environ.get("DEMO_RUN_DIR"):
        run = Path(os.environ["DEMO_RUN_DIR"]).resolve()
        assert list(run.glob("plots/*.png")), f"{run}/plots holds no PNG: run python -m dpo.plot {run}"
        return run
    run = tmp_path_factory.mktemp("demo") / "run"
    with pytest.MonkeyPatch.context() as patch:
        # The trainer's own plots take seconds, and the demo only needs some PNG to show.
        patch.setattr("dpo.run.plot_run_quietly", lambda run_dir: "plots skipped by tests/test_demo.py",
                      raising=False)
        train_script.train(quick(run, "loss=sft", "n_examples=128", "eval_every=128", "n_eval_examples=32",
                                 "do_first_eval=false", "sample_during_eval=false"))
    (run / "plots").mkdir(exist_ok=True)
    write_png(run / "plots" / "tiny.png")
    return run


def first_plot(run_dir: Path) -> Path:
    """The plot the page shows first, as `dpo.demo.list_plots` orders them."""
    return run_dir / "plots" / list_plots(str(run_dir / "plots"))[0]


def png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]  # the IHDR chunk comes first


@pytest.fixture(scope="module")
def pair(run_dir):
    return load_side_by_side(str(run_dir), device="cpu")


@pytest.fixture(scope="module")
def client(pair, run_dir):
    return create_app(pair, str(run_dir)).test_client()


def expected_row(pair, options=OPTIONS):
    return pair.complete([PROMPT], GenerationOptions(**options), dataset_source("toy").judge)[0]


# ---- the app, through Flask's test client ------------------------------------------------------------

def test_the_page_has_both_tabs_and_loads_nothing_from_outside(client, run_dir):
    page = client.get("/").get_data(as_text=True)
    for element_id in ("prompt", "generate", "policy-output", "reference-output", "policy-judge", "tab-generate",
                       "tab-plots", "max_new_tokens", "temperature", "top_p", "greedy", "seed", "example-0"):
        assert f'id="{element_id}"' in page, element_id
    assert str(run_dir) in page and "toy" in page
    assert not re.search(r'(src|href|action)="(https?:)?//', page)  # offline: nothing fetched from elsewhere


def test_generate_answers_both_completions_and_the_judges_scores(client, pair):
    answer = client.post("/api/generate", json={"prompt": PROMPT, **OPTIONS})
    assert answer.status_code == 200
    expected = expected_row(pair)
    assert answer.get_json() == expected
    assert set(expected) == {"prompt", "policy", "reference", "judge_policy", "judge_reference"}
    as_typed = {"prompt": PROMPT, "max_new_tokens": "12", "temperature": "1", "top_p": "1", "seed": "0"}
    assert client.post("/api/generate", json=as_typed).get_json() == expected  # numbers as the page sends them


@pytest.mark.parametrize("fields, message", [
    ({"prompt": " \n"}, "the prompt is empty: type the text the models should continue"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a whole number from 1 to 512, got 0"),
    ({"max_new_tokens": "ten"}, "max_new_tokens must be a whole number from 1 to 512, got 'ten'"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number from 1 to 512, got 2.5"),
    ({"temperature": 0}, "temperature must be a number from 0.01 to 10, got 0; tick greedy for the most likely tokens"),
    ({"temperature": 1e-300}, "temperature must be a number from 0.01 to 10, got 1e-300; tick greedy for the most"),
    ({"temperature": "nan"}, "temperature must be a number from 0.01 to 10, got 'nan'"),
    ({"top_p": 1.5}, "top_p must be a number above 0 and at most 1, got 1.5"),
    ({"seed": -1}, "seed must be a whole number from 0 to 4294967295, got -1"),
    ({"seed": True}, "seed must be a whole number from 0 to 4294967295, got True"),
    ({"greedy": "maybe"}, "greedy must be true or false, got 'maybe'"),
    ({"prompt": 5}, "the prompt must be text, got 5"),
    ({"temp": 1}, "unknown field 'temp': the fields are prompt, max_new_tokens, temperature, top_p, greedy, seed"),
    ({"max_new_tokens": 120}, "max_new_tokens=120 go past the model's context of 128 tokens: shorten the prompt"),
])
def test_bad_input_is_refused_with_one_clear_message(client, fields, message):
    answer = client.post("/api/generate", json={"prompt": PROMPT, **fields})
    assert answer.status_code == 400
    assert message in answer.get_json()["error"]


def test_a_lone_surrogate_and_json_nested_too_deep_are_a_400_not_a_500(client):
    # was: HTTP 500 "generation failed (TypeError: TextEncodeInput must be Union[...])" from the tokenizer
    answer = client.post("/api/generate", data='{"prompt": "abc\\ud800def"}', content_type="application/json")
    assert answer.status_code == 400
    assert answer.get_json()["error"] == ("the prompt holds a lone surrogate, U+D800 at character 3, which is half "
                                          "of a character and not text: send the prompt as valid Unicode")
    answer = client.post("/api/generate", data="[" * 100_000, content_type="application/json")
    assert answer.status_code == 400 and "send a JSON object" in answer.get_json()["error"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(client):
    # was: any size parsed (a 200 MB body was read, then refused; five at once took the process to 1.95 GB)
    from dpo.demo import MAX_PROMPT_CHARS, MAX_REQUEST_BYTES

    message = "the request body is over 256 KiB, more than a prompt of 20000 characters needs: shorten the prompt"
    answer = client.post("/api/generate", data=b" " * (MAX_REQUEST_BYTES + 1), content_type="application/json")
    assert answer.status_code == 413 and answer.get_json() == {"error": message}
    page = client.post("/", data={"prompt": "x" * MAX_REQUEST_BYTES})
    assert page.status_code == 413 and message in page.get_data(as_text=True)
    # the longest prompt allowed fits, even of 4-byte characters escaped as JSON surrogate pairs (12 bytes each)
    longest = '{"prompt": "' + "\\ud83d\\ude00" * MAX_PROMPT_CHARS + '"}'
    assert len(longest.encode()) <= MAX_REQUEST_BYTES
    answer = client.post("/api/generate", data=longest, content_type="application/json")
    assert answer.status_code == 400 and "go past the model's context" in answer.get_json()["error"]


FOREIGN = "refused: this request comes from the page {!r}, not from the demo's own, and another site must not " \
          "drive generations; open {} and generate there"


@pytest.mark.parametrize("headers, sender", [
    ({"Origin": "http://evil.example"}, "http://evil.example"),
    ({"Origin": "null"}, "null"),  # a sandboxed frame on any site
    ({"Referer": "http://evil.example/page.html"}, "http://evil.example/page.html"),
    ({"Origin": "http://127.0.0.1:9999"}, "http://127.0.0.1:9999"),  # another port: another site
])
def test_a_post_from_another_sites_page_is_refused(pair, run_dir, headers, sender):
    # was: answered (the form route took cross-origin POSTs, and any Host)
    client = create_app(pair, str(run_dir), DemoTask(), port=7860).test_client()
    host = {"Host": "127.0.0.1:7860"}
    answer = client.post("/api/generate", json={"prompt": PROMPT}, headers={**host, **headers})
    assert answer.status_code == 403
    assert answer.get_json() == {"error": FOREIGN.format(sender, "http://127.0.0.1:7860/")}
    form = client.post("/", data={"prompt": PROMPT}, headers={**host, **headers})
    refused = FOREIGN.format(sender, "http://127.0.0.1:7860/")
    assert form.status_code == 403 and form.get_data(as_text=True) == refused + "\n"


def test_only_the_demos_own_addresses_are_answered(pair, run_dir):
    client = create_app(pair, str(run_dir), DemoTask(), port=7860, allow_hosts=["localhost:8000"]).test_client()
    fields = {"prompt": PROMPT, "max_new_tokens": 2}
    for host in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860", "LOCALHOST:7860", "localhost:8000"):
        assert client.get("/", headers={"Host": host}).status_code == 200, host
        own = {"Host": host, "Origin": f"http://{host}"}
        assert client.post("/api/generate", json=fields, headers=own).status_code == 200, host
    assert client.post("/api/generate", json=fields, headers={"Host": "127.0.0.1:7860",
                                                              "Origin": "http://localhost:7860"}).status_code == 200
    for host in ("evil.example:7860", "127.0.0.1:7861", "localhost", "127.0.0.1.evil.example:7860"):
        answer = client.get("/", headers={"Host": host})  # DNS rebinding: another name for this machine's address
        assert answer.status_code == 403, host
        assert answer.get_data(as_text=True).startswith(f"refused: Host {host!r} is not an address of this demo")
        assert f"start the demo with --allow-host {host}" in answer.get_data(as_text=True)
        assert client.post("/api/generate", json=fields, headers={"Host": host}).status_code == 403


def test_a_prompt_the_judge_cannot_score_still_gets_both_completions(client):
    answer = client.post("/api/generate", json={"prompt": "Once upon a time", "max_new_tokens": 8})
    row = answer.get_json()
    assert answer.status_code == 200 and isinstance(row["policy"], str) and isinstance(row["reference"], str)
    assert "judge_policy" not in row and row["judge_skipped"].startswith("not a toy prompt")
    page = client.post("/", data={"prompt": "Once upon a time", "max_new_tokens": "8"}).get_data(as_text=True)
    assert '<span id="policy-judge">none</span>' in page and "Not judged: not a toy prompt" in page


def test_a_failure_while_generating_is_reported_in_the_page(client, pair, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(pair, "complete", broken)
    answer = client.post("/api/generate", json={"prompt": PROMPT})
    assert answer.status_code == 500
    assert answer.get_json()["error"].startswith("generation failed (RuntimeError: the device went away)")


def test_a_body_that_is_not_a_json_object_is_refused(client):
    for body in ("prompt=hi", "[1, 2]"):
        answer = client.post("/api/generate", data=body, content_type="application/json")
        assert answer.status_code == 400 and "send a JSON object" in answer.get_json()["error"]


def test_the_form_works_without_javascript(client, pair):
    # Browsers send a textarea's line breaks as \r\n.
    form = {"prompt": PROMPT.replace("\n", "\r\n"), "max_new_tokens": "12", "temperature": "1", "top_p": "1",
            "seed": "0"}
    answer = client.post("/", data=form)
    page = answer.get_data(as_text=True)
    expected = expected_row(pair)
    assert answer.status_code == 200
    assert f'id="policy-output" class="output">\n{escape(expected["policy"])}</pre>' in page
    assert f'id="reference-output" class="output">\n{escape(expected["reference"])}</pre>' in page
    assert f'<span id="policy-judge">{expected["judge_policy"]:.2f}</span>' in page
    assert f"\n{escape(PROMPT)}</textarea>" in page  # the prompt stays, its leading line breaks too

    refused = client.post("/", data={**form, "top_p": "2"})
    page = refused.get_data(as_text=True)
    assert refused.status_code == 400 and "Traceback" not in page
    assert "top_p must be a number above 0 and at most 1, got &#39;2&#39;" in page
    assert 'value="2"' in page  # what was sent stays in the form, to be corrected


def test_the_plots_tab_serves_the_runs_pngs(client, run_dir):
    page = client.get("/").get_data(as_text=True)
    plots = sorted((run_dir / "plots").glob("*.png"))
    assert f"Plots ({len(plots)})" in page
    for plot in plots:
        assert f'<img src="plots/{plot.name}" alt="{plot.name}">' in page
        image = client.get(f"/plots/{plot.name}")
        assert image.status_code == 200 and image.mimetype == "image/png" and image.data == plot.read_bytes()
    for name in ("missing.png", "..%2Fconfig.yaml", "..%2F..%2Frun%2Fplots%2Ftiny.png"):
        assert client.get(f"/plots/{name}").status_code == 404, name


def test_without_plots_the_page_says_how_to_make_them(pair, tmp_path):
    page = create_app(pair, str(tmp_path), DemoTask()).test_client().get("/").get_data(as_text=True)
    assert 'id="no-plots"' in page and f"python -m dpo.plot {tmp_path}" in page
    assert 'id="policy-judge"' not in page and 'id="examples"' not in page  # no judge, no example prompts


def test_the_judge_is_that_of_the_runs_one_judged_dataset():
    toy = judged_task(("toy", "hh"))
    assert toy.judge_name == "toy" and toy.judge(PROMPT, " hfdb") == 1.0
    assert len(toy.example_prompts) == 4 and all(prompt.startswith("\n\nHuman: reverse ") for prompt in toy.example_prompts)
    assert judged_task(("hh",)) == DemoTask() and judged_task(()) == DemoTask()


def test_a_bad_run_dir_is_one_line_and_exit_1(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "is not a directory" in error
    assert main([str(tmp_path)]) == 1
    assert "is not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("gpu7", "--device gpu7 is not a torch device"),
                                             ("cuda", "--device cuda asks for a GPU, but torch sees none here")])
def test_a_bad_device_is_refused_before_the_models_load(tmp_path, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main([str(tmp_path / "never_loaded"), "--device", device, "--port", str(free_port())]) == 1
    assert message in capsys.readouterr().err


def test_a_taken_port_is_refused_before_the_models_load(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([str(tmp_path / "never_loaded"), "--port", str(port)]) == 1
    assert f"error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# ---- a person in a real browser ------------------------------------------------------------------

@pytest.fixture
def browser():
    """A headless Chromium driven through Debian's chromedriver, or a skip that says how to install them."""
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip(f"selenium is not installed: {INSTALL_HINT}")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or shutil.which("/usr/lib/chromium/chromedriver")
    if not (chromium and driver):
        pytest.skip(f"chromium or chromedriver not found: {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # with both paths given, selenium downloads nothing
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--no-first-run", "--disable-background-networking", "--window-size=1280,900"):
        options.add_argument(argument)  # --no-sandbox: Chromium refuses to run as root with its sandbox
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield browser
    browser.quit()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def demo_url(run_dir, tmp_path):
    """`python -m dpo.demo RUN_DIR` running as a person starts it, until the test ends."""
    port = free_port()
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "dpo.demo", str(run_dir), "--port", str(port),
                                   "--device", "cpu"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_it_answers(url, server, log_path)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    assert "Traceback" not in log_path.read_text()


def wait_until_it_answers(url: str, server: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the demo exited with code {server.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"the demo did not answer at {url} within {timeout} s:\n{log_path.read_text()}")


def screenshot_paths(tmp_path: Path, suffix: str = "") -> list[Path]:
    """Where a screenshot goes: the test's tmp dir, and beside $DEMO_SCREENSHOT when it is set."""
    paths = [tmp_path / f"demo{suffix}.png"]
    if os.environ.get("DEMO_SCREENSHOT"):
        wanted = Path(os.environ["DEMO_SCREENSHOT"])
        paths.append(wanted.with_name(wanted.stem + suffix + wanted.suffix))
    return paths


def save_screenshots(browser, paths: list[Path]) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(path)), path


def replace_text(browser, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    element = browser.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(text)


def test_the_running_server_refuses_oversized_and_foreign_requests(demo_url):
    import http.client
    import json
    from urllib.parse import urlsplit

    address = urlsplit(demo_url)

    def post(headers: dict, body: bytes = b"", length: Optional[int] = None):
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        connection.putrequest("POST", "/api/generate", skip_host=True)
        for name, value in {"Host": address.netloc, "Content-Type": "application/json",
                            "Content-Length": str(len(body) if length is None else length), **headers}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        answer = (response.status, json.loads(response.read()))
        connection.close()
        return answer

    fields = json.dumps({"prompt": PROMPT, "max_new_tokens": 4}).encode()
    # 200 MB announced and none of it sent: refused at once, from the header, never read
    status, answer = post({}, length=200_000_000)
    assert status == 413 and "the request body is over 256 KiB" in answer["error"]
    status, answer = post({"Origin": "http://evil.example"}, fields)
    assert status == 403 and answer["error"].startswith("refused: this request comes from the page 'http://evil")
    status, answer = post({"Host": f"evil.example:{address.port}"}, fields)
    assert status == 403 and answer["error"].startswith("refused: Host 'evil.example:")
    status, answer = post({"Origin": f"http://{address.netloc}"}, fields)
    assert status == 200 and {"policy", "reference"} <= set(answer)


def test_a_person_generates_and_looks_at_the_plots_in_a_browser(browser, demo_url, pair, run_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def state():
        return browser.find_element(By.ID, "results").get_attribute("data-state")

    browser.get(demo_url)
    replace_text(browser, "prompt", PROMPT)  # typed: its line breaks are Enter presses
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == PROMPT
    replace_text(browser, "max_new_tokens", "12")

    replace_text(browser, "temperature", "0")  # a slip first: the page says what is wrong
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda _: state() == "error")
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.text == ("temperature must be a number from 0.01 to 10, got '0'; tick "
                                                   "greedy for the most likely tokens")

    replace_text(browser, "temperature", "1")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda _: state() == "done")
    shown = {role: browser.find_element(By.ID, f"{role}-output").get_attribute("textContent")
             for role in ("policy", "reference")}
    expected = expected_row(pair)
    assert shown == {"policy": expected["policy"], "reference": expected["reference"]}
    assert all(shown.values()), shown
    for role in ("policy", "reference"):
        assert browser.find_element(By.ID, f"{role}-judge").text == f"{expected['judge_' + role]:.2f}"
    assert not browser.find_element(By.ID, "error").is_displayed()
    save_screenshots(browser, screenshot_paths(tmp_path))

    browser.find_element(By.ID, "tab-plots").click()
    image = browser.find_element(By.CSS_SELECTOR, "#panel-plots img")
    WebDriverWait(browser, 10).until(lambda _: browser.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    shown_width = browser.execute_script("return arguments[0].naturalWidth", image)
    assert shown_width == png_width(first_plot(run_dir))  # the PNG itself, decoded
    assert image.is_displayed() and not browser.find_element(By.ID, "panel-generate").is_displayed()
    save_screenshots(browser, screenshot_paths(tmp_path, "_plots"))
    assert (tmp_path / "demo.png").stat().st_size > 0
