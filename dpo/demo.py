"""A local web page to try a run: the policy's and the reference's completions side by side, and its plots.

    python -m dpo.demo RUN_DIR [--port 7860] [--host 127.0.0.1] [--device cpu] [--reference MODEL]

RUN_DIR is what `python -m dpo.generate` takes (a run directory, one of its checkpoints, or a Hugging
Face model directory with `--reference`); both models load once, at start. The page has two tabs.
"Generate": type a prompt, set the sampling options, press Generate, and read both completions (with
the judge's scores when the run's dataset has a judge, as `toy` does). "Plots": the PNGs that
`python -m dpo.plot RUN_DIR` wrote to `RUN_DIR/plots/`. The page works offline: it loads nothing from
outside, and it also works without JavaScript (the form then reloads the page). Generation runs one
request at a time, since the models are not thread-safe. `POST /api/generate` takes the same options
as JSON and answers `dpo.generate`'s row, or HTTP 400 with `{"error": ...}`.

Only the demo's own page may drive it: a request whose Host is not an address the demo serves (the
loopback names and `--host`, on its port, and any `--allow-host`) is refused with HTTP 403, which stops
DNS rebinding, and so is a POST whose Origin (or, without one, Referer) is another site's page. A
request body over 256 KiB is refused (HTTP 413) before it is read.

Flask serves it (an optional dependency: `pip install -e ".[demo]"`): it is small and stable, needs no
frontend build, and makes no network calls, where Gradio is far heavier and phones home by default.
Its built-in server is meant for one person on their own machine, which is what this is.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import urlsplit

from dpo.errors import ConfigError, UserError
from dpo.generate import MIN_TEMPERATURE, GenerationOptions, Judge, SideBySide, load_side_by_side
from dpo.models import context_length

INSTALL_HINT = 'pip install -e ".[demo]"'
PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_static")
MAX_NEW_TOKENS = 512
MAX_TEMPERATURE = 10
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 20_000
# The largest body a request may send, refused before it is read (HTTP 413): a prompt of MAX_PROMPT_CHARS
# characters fits even at 12 bytes each (a 4-byte UTF-8 character percent-encoded by a form, or a surrogate
# pair JSON-escaped), with room for the options; without a limit a 200 MB body was parsed before being refused.
MAX_REQUEST_BYTES = 256 * 1024
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
N_EXAMPLE_PROMPTS = 4
OPTION_NAMES = ("max_new_tokens", "temperature", "top_p", "greedy", "seed")


class DemoDependencyError(UserError):
    """Flask, which only the demo needs, is not installed."""


class RequestError(UserError):
    """A prompt or generation option sent by the page is missing, malformed or out of range."""


@dataclass(frozen=True)
class DemoTask:
    """What the page offers beyond the two models: the judge and a few prompts to start from."""

    judge: Optional[Judge] = None
    judge_name: str = ""
    example_prompts: tuple[str, ...] = ()


def judged_task(datasets: tuple[str, ...]) -> DemoTask:
    """The judge and first test prompts of the run's one dataset with a judge; none when zero or several have one."""
    from dpo.data import dataset_source
    from dpo.generate import read_prompts

    judged = []
    names = [name for name in datasets if isinstance(name, str)]  # mapped datasets have no judge
    for name in dict.fromkeys(names):  # a dataset listed twice is still one judge
        try:
            if dataset_source(name).judge is not None:
                judged.append(name)
        except UserError:  # a dataset gone since the run: the models still compare, unjudged
            continue
    if len(judged) != 1:
        return DemoTask()
    prompts, judge = read_prompts(judged[0], N_EXAMPLE_PROMPTS)
    return DemoTask(judge, judged[0], tuple(prompts))


# ---- reading a request -----------------------------------------------------------------------------

def parse_request(fields: dict) -> tuple[str, GenerationOptions]:
    """The prompt and options of a JSON body or a submitted form; numbers may come as text."""
    unknown = sorted(set(fields) - {"prompt", *OPTION_NAMES})
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}: the fields are prompt, {', '.join(OPTION_NAMES)}")
    prompt = fields.get("prompt", "")
    if not isinstance(prompt, str):
        raise RequestError(f"the prompt must be text, got {prompt!r}")
    if not prompt.strip():
        raise RequestError("the prompt is empty: type the text the models should continue")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"the prompt has {len(prompt)} characters, more than {MAX_PROMPT_CHARS}: shorten it")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON may spell half of a character ("\ud800"), which is no text
        raise RequestError(f"the prompt holds a lone surrogate, U+{ord(prompt[error.start]):04X} at character "
                           f"{error.start}, which is half of a character and not text: send the prompt as valid "
                           "Unicode") from None
    defaults = GenerationOptions()
    options = GenerationOptions(
        max_new_tokens=_number(fields, "max_new_tokens", defaults.max_new_tokens, int, 1, MAX_NEW_TOKENS),
        temperature=_number(fields, "temperature", defaults.temperature, float, MIN_TEMPERATURE, MAX_TEMPERATURE,
                            hint="; tick greedy for the most likely tokens"),
        top_p=_number(fields, "top_p", defaults.top_p, float, 0, 1, above_low=True),
        greedy=_flag(fields.get("greedy", defaults.greedy)),
        seed=_number(fields, "seed", defaults.seed, int, 0, MAX_SEED),
    )
    return _unix_line_breaks(prompt), options


def _unix_line_breaks(text: str) -> str:
    return text.replace("\r\n", "\n")  # browsers send a textarea's line breaks as \r\n; models know \n


def _number(fields: dict, name: str, default, kind: type, low, high, above_low: bool = False, hint: str = ""):
    value = fields.get(name, default)
    bounds = f"above {low} and at most {high}" if above_low else f"from {low} to {high}"
    refusal = RequestError(f"{name} must be a {'whole ' if kind is int else ''}number {bounds}, got {value!r}{hint}")
    if isinstance(value, bool):  # JSON true is an int to Python, and never meant as one
        raise refusal
    try:
        number = kind(value.strip()) if isinstance(value, str) else kind(value)
    except (TypeError, ValueError, OverflowError):
        raise refusal from None
    if kind is float and not math.isfinite(number):
        raise refusal
    if kind is int and not isinstance(value, str) and number != value:  # JSON 1.5 would silently become 1
        raise refusal
    if not (low < number if above_low else low <= number) or number > high:
        raise refusal
    return number


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "true", "1", "yes"):  # "on": a ticked checkbox
        return True
    if isinstance(value, str) and value.lower() in ("", "off", "false", "0", "no"):
        return False
    raise RequestError(f"greedy must be true or false, got {value!r}")


def check_context(pair: SideBySide, prompt: str, options: GenerationOptions) -> None:
    """Refuse a prompt and length that run past the policy's context, where its positions mean nothing."""
    context, _ = context_length(pair.policy)
    if not context:
        return
    prompt_tokens = len(pair.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if prompt_tokens + options.max_new_tokens > context:
        raise RequestError(f"the prompt ({prompt_tokens} tokens) and max_new_tokens={options.max_new_tokens} go past "
                           f"the model's context of {context} tokens: shorten the prompt or lower max new tokens")


# ---- the app ---------------------------------------------------------------------------------------

def create_app(pair: SideBySide, run_dir: str, task: Optional[DemoTask] = None, host: str = "127.0.0.1",
               port: Optional[int] = None, allow_hosts: Iterable[str] = ()):
    """The Flask app serving `pair` and the plots of `run_dir`; `task` defaults to the judged task of the run.

    It answers requests addressed to `host` or a loopback name on `port` (any port when None) or to one of
    `allow_hosts`, and POSTs from those addresses' pages only.
    """
    flask = _import_flask()
    task = judged_task(pair.datasets) if task is None else task
    plots_dir = os.path.join(os.path.abspath(run_dir), "plots")
    generating = threading.Lock()  # one generation at a time: the models are not thread-safe
    app = flask.Flask(__name__, template_folder=PAGE_DIR, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    served = served_addresses(host, port, allow_hosts)
    own_page = (f"http://{_bracketed('127.0.0.1' if host in WILDCARD_HOSTS else host)}:{port}/" if port
                else "the demo's own page")

    def refusal(message: str, status: int):
        if flask.request.path.startswith("/api/"):
            return {"error": message}, status
        return message + "\n", status, {"Content-Type": "text/plain; charset=utf-8"}

    @app.before_request
    def only_from_this_demo():  # another site's page must not read the page or drive generations
        if not is_served(flask.request.host, served):
            return refusal(f"refused: Host {flask.request.host!r} is not an address of this demo ("
                           f"{', '.join(sorted(served))}); open {own_page}, or, through a tunnel or proxy, start "
                           f"the demo with --allow-host {flask.request.host}", 403)
        if flask.request.method == "POST":
            origin = flask.request.headers.get("Origin")
            sender = origin if origin is not None else flask.request.headers.get("Referer")
            if sender is not None and not is_served(_url_host(sender), served):
                return refusal(f"refused: this request comes from the page {sender!r}, not from the demo's own, "
                               f"and another site must not drive generations; open {own_page} and generate there",
                               403)
        return None

    @app.errorhandler(413)
    def too_large(error):
        message = (f"the request body is over {MAX_REQUEST_BYTES // 1024} KiB, more than a prompt of "
                   f"{MAX_PROMPT_CHARS} characters needs: shorten the prompt")
        if flask.request.path.startswith("/api/"):
            return {"error": message}, 413
        return page({}, error=message, status=413)

    def complete(fields: dict) -> dict:
        prompt, options = parse_request(fields)
        with generating:  # the tokenizer too: generation changes its padding side for a while
            check_context(pair, prompt, options)
            row = pair.complete([prompt], options)[0]
        return judged(row, task.judge)

    def page(fields: dict, row: Optional[dict] = None, error: str = "", status: int = 200):
        html = flask.render_template("demo.html", run_dir=os.path.abspath(run_dir), task=task,
                                     plots=list_plots(plots_dir), fields=_form_values(fields), row=row, error=error,
                                     limits={"max_new_tokens": MAX_NEW_TOKENS, "temperature": MAX_TEMPERATURE,
                                             "min_temperature": MIN_TEMPERATURE, "seed": MAX_SEED})
        return html, status

    @app.get("/")
    def index():
        return page({})

    @app.post("/")
    def index_form():  # the page without JavaScript: the form posts here and the page comes back filled in
        fields = flask.request.form.to_dict()
        try:
            return page(fields, row=complete(fields))
        except RequestError as error:
            return page(fields, error=str(error), status=400)

    @app.post("/api/generate")
    def generate_json():
        try:
            fields = flask.request.get_json(silent=True)
        except RecursionError:  # "[[[[..." nested deeper than Python's JSON reader goes
            fields = None
        if not isinstance(fields, dict):
            return {"error": 'send a JSON object such as {"prompt": "...", "max_new_tokens": 64}'}, 400
        try:
            return complete(fields)
        except RequestError as error:
            return {"error": str(error)}, 400

    @app.errorhandler(500)
    def failed(error):  # not the person's input but a bug or the device: say so where they look
        cause = getattr(error, "original_exception", None) or error
        message = f"generation failed ({type(cause).__name__}: {cause}); the demo's terminal shows the traceback"
        if flask.request.path.startswith("/api/"):
            return {"error": message}, 500
        return page({}, error=message, status=500)

    @app.get("/plots/<name>")
    def plot(name: str):
        if not name.lower().endswith(".png"):
            flask.abort(404)
        return flask.send_from_directory(plots_dir, name)  # refuses names that leave the folder

    return app


def served_addresses(host: str, port: Optional[int], allow_hosts: Iterable[str] = ()) -> set[str]:
    """The Host values the demo answers: `name:port` for the loopback names and `host` (for a wildcard `host`, this
    machine's names and addresses), each `allow_hosts` entry as given (`name` or `name:port`), lower case."""
    names = set(LOOPBACK_NAMES)
    if host in WILDCARD_HOSTS:  # other machines may come in: by this machine's names and addresses
        names |= {socket.gethostname(), socket.getfqdn()}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    else:
        names.add(host)
    served = {_bracketed(name).lower().rstrip(".") + (f":{port}" if port else "") for name in names if name}
    return served | {name.lower().rstrip(".") for name in allow_hosts}


def is_served(host_header: str, served: set[str]) -> bool:
    """Whether a Host value (or the host of an Origin) names this demo; a missing port is HTTP's 80."""
    name, port = _split_host(host_header)
    if not name:
        return False
    return name in served or f"{name}:{port or 80}" in served


def _split_host(value: str) -> tuple[str, Optional[int]]:
    """`name:port`, `[v6]:port` or a bare name, as (lower-case name, port or None); ('', None) when malformed."""
    value = (value or "").strip().lower()
    if value.startswith("["):
        name, _, rest = value.partition("]")
        name, port = name + "]", rest[1:] if rest.startswith(":") else ("" if not rest else None)
    else:
        name, _, port = value.partition(":")
    if port is None or (port and not port.isdigit()):
        return "", None
    return name.rstrip("."), int(port) if port else None


def _url_host(url: str) -> str:
    """The host:port of an Origin or Referer URL, with the port its scheme implies; '' for `null` or no URL."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return ""
    if not parts.hostname or port is None:
        return ""
    return f"{_bracketed(parts.hostname)}:{port}"


def _bracketed(name: str) -> str:
    return f"[{name}]" if ":" in name and not name.startswith("[") else name


def judged(row: dict, judge: Optional[Judge]) -> dict:
    """`row` with both completions' judge scores, or with the reason the judge cannot score its prompt."""
    if judge is None:
        return row
    try:
        return {**row, **{f"judge_{role}": judge(row["prompt"], row[role]) for role in ("policy", "reference")}}
    except ValueError as error:  # a prompt unlike the task's: a person may type anything
        return {**row, "judge_skipped": str(error)}


def list_plots(plots_dir: str) -> list[str]:
    """The PNG files in `plots_dir`, the overview first; none when the folder is missing."""
    if not os.path.isdir(plots_dir):
        return []
    names = sorted(name for name in os.listdir(plots_dir) if name.lower().endswith(".png"))
    return sorted(names, key=lambda name: name != "overview.png")


def _form_values(fields: dict) -> dict:
    """What the form's inputs show: the defaults, or the values a submitted form sent, even refused ones."""
    defaults = GenerationOptions()
    values = {"prompt": "", **{name: getattr(defaults, name) for name in OPTION_NAMES}}
    if fields:
        values.update({key: value for key, value in fields.items() if key in values})
        values["prompt"] = _unix_line_breaks(values["prompt"])
        values["greedy"] = "greedy" in fields  # an unticked checkbox sends nothing
    return values


def _import_flask():
    try:
        import flask
    except ImportError:
        raise DemoDependencyError(f"the demo needs Flask, which is not installed: {INSTALL_HINT}") from None
    return flask


# ---- the command -----------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", metavar="RUN_DIR", help="a run directory, one of its checkpoints, or a Hugging "
                                                        "Face model directory (with --reference)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 lets other machines in: only on a trusted network")
    parser.add_argument("--device", help="where the models run (default: a GPU if visible)")
    parser.add_argument("--reference", help="the starting model, for a Hugging Face model directory")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME[:PORT]",
                        help="also answer requests addressed to this host, e.g. localhost:8000 through an SSH tunnel")
    args = parser.parse_args(argv)
    try:
        _import_flask()  # before the models load, so that these mistakes are told at once
        _check_port(args.host, args.port)
        _check_device(args.device)
        pair = load_side_by_side(args.path, args.reference, device=args.device)
        app = create_app(pair, pair.run_dir or args.path, host=args.host, port=args.port,
                         allow_hosts=args.allow_host)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from werkzeug.serving import make_server

    server = make_server(args.host, args.port, app, threaded=True)
    print(f"demo of {pair.run_dir or args.path} at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # the way to stop a server: not an error
    return 0


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is out of range or taken, as the server would, but before minutes of model loading."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be from 1 to 65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            probe.bind((host, port))
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror or error}): pass a free --port, or "
                          "--host with an address of this machine") from None


def _check_device(device: Optional[str]) -> None:
    import torch

    try:
        kind = torch.device(device).type if device else None
    except RuntimeError:
        raise ConfigError(f"--device {device} is not a torch device: give cpu, cuda, cuda:1 or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asks for a GPU, but torch sees none here: use --device cpu")


if __name__ == "__main__":
    sys.exit(main())
