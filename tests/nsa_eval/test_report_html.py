"""The HTML report in real headless Chromium (Debian's `chromium`), driven over the DevTools protocol:
tables and images render without console errors, sorting and drill-down work, and a <script> that a
model wrote shows as text and never runs."""

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from nsa_eval.report.build import build_report
from report_runs import choice_task, niah, write_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh --dev installs it)"),
    pytest.mark.slow,  # a browser and a report with figures: seconds before the first test
]
websocket = pytest.importorskip("websocket", reason="websocket-client is not installed (pip install -e '.[dev]')")

PAYLOAD = "<script>document.title='pwned';document.body.setAttribute('data-pwned','1')</script>"
IMG_PAYLOAD = "<img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">"


class Chromium:
    """A headless Chromium page driven over the DevTools protocol; collects console errors and exceptions."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        log = Path(self.profile) / "stderr.log"  # a file, not a pipe: nobody reads chromium's chatter later
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={self.profile}",
                 "--remote-debugging-port=0", "--window-size=1400,1000", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=stderr)
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline and self.process.poll() is None:
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", log.read_text(errors="replace"))
            port = match and match.group(1)
            time.sleep(0.05)
        assert port, f"chromium did not open its DevTools port: {log.read_text(errors='replace')[-2000:]}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id = 0
        self.errors: list[str] = []
        self.loaded = False
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message.get("result", {})
            self._event(message)

    def _event(self, message):
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(params["exceptionDetails"].get("exception", {}).get("description")
                               or params["exceptionDetails"]["text"])
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert", "warning"):
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            self.errors.append(params["entry"]["text"])
        elif method == "Page.loadEventFired":
            self.loaded = True

    def open(self, path: Path):
        self.loaded = False
        self.call("Page.navigate", url=path.resolve().as_uri())
        deadline = time.monotonic() + 30
        while not self.loaded and time.monotonic() < deadline:
            self._event(json.loads(self.socket.recv()))
        assert self.loaded, f"{path} did not load"
        self.evaluate("1")  # let pending console events arrive

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def close(self):
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    chromium = Chromium()
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    grid = dict(lengths=(1024, 2048, 4096), depths=(0, 50, 100), per_cell=3)
    hostile = lambda value, right: f"{PAYLOAD} {IMG_PAYLOAD} {value if right else 'no idea'}"  # noqa: E731
    full = write_run(root, "full-1", "Full <b>attn</b>", {"niah": niah(lambda length, depth: 0.8, **grid),
                                                          "mmlu": choice_task(0.5, n=40)})
    nsa = write_run(root, "nsa-1", "NSA", {"niah": niah(lambda length, depth: 1.0, seed=1, response=hostile, **grid),
                                           "mmlu": choice_task(0.6, n=40)})
    out = tmp_path_factory.mktemp("report")
    build_report([full, nsa], out, baseline="full-1", reference="nsa-paper", formats=("html",))
    return out / "report.html"


def test_detects_console_errors(browser, tmp_path):
    """The check below can fail: a page that throws is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><title>x</title><script>console.error('boom'); undefinedFunction();</script>")
    browser.errors.clear()
    browser.open(page)
    assert any("boom" in e for e in browser.errors) and any("undefinedFunction" in e for e in browser.errors)


def test_renders_tables_and_images_without_console_errors(browser, report):
    browser.errors.clear()
    browser.open(report)
    assert browser.errors == []
    assert browser.evaluate("document.title") == "nsa-eval report: Full <b>attn</b>, NSA"
    assert browser.evaluate("document.querySelectorAll('table.sortable tbody tr').length") > 20
    images = browser.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.src.slice(0, 22)])")
    assert len(images) == 4  # two heatmaps, a difference map, score by length
    assert all(done and width > 300 and src == "data:image/png;base64," for done, width, src in images)
    # a model name with markup is text, not markup
    assert browser.evaluate("document.querySelectorAll('b').length") == 0


def test_a_script_in_a_response_shows_as_text_and_does_not_run(browser, report):
    browser.errors.clear()
    browser.open(report)
    assert browser.evaluate("document.body.getAttribute('data-pwned')") is None
    assert browser.evaluate("document.title") != "pwned"
    texts = browser.evaluate("Array.from(document.querySelectorAll('section.samples pre')).map(p => p.textContent)")
    assert sum(PAYLOAD in t and IMG_PAYLOAD in t for t in texts) == 27  # every NSA needle response, as text
    assert browser.errors == []


def test_drill_down_shows_the_samples_of_a_cell(browser, report):
    browser.open(report)
    link = "Array.from(document.querySelectorAll('a.drill')).find(a => a.dataset.filters.includes('\"depth\": \"50\"') && a.dataset.filters.includes('\"length\": \"2048\"') && a.dataset.panel === 'samples-1-niah')"
    assert browser.evaluate(f"{link}.textContent") == "1.000 (n=3)"
    browser.evaluate(f"{link}.click()")
    panel = "document.getElementById('samples-1-niah')"
    assert browser.evaluate(f"{panel}.hidden") is False
    shown = browser.evaluate(f"Array.from({panel}.querySelectorAll('tbody tr')).filter(r => !r.hidden).map(r => r.cells[0].textContent)")
    assert sorted(shown) == ["niah-2048-50-0", "niah-2048-50-1", "niah-2048-50-2"]
    assert "3 samples" in browser.evaluate(f"{panel}.querySelector('.filter').textContent")
    # a whole-task cell shows every sample of the task
    browser.evaluate("document.querySelector('#by-task a.drill, #by-task ~ table a.drill').click()")
    visible = browser.evaluate("Array.from(document.querySelectorAll('section.samples')).filter(s => !s.hidden).map(s => s.id)")
    assert visible == ["samples-0-niah"]
    assert browser.evaluate("document.querySelectorAll('#samples-0-niah tbody tr:not([hidden])').length") == 27


def test_tables_sort_by_a_clicked_column(browser, report):
    browser.open(report)
    table = "document.getElementById('niah-by-depth').nextElementSibling"
    column = f"Array.from({table}.tBodies[0].rows).map(r => r.cells[0].textContent)"
    assert browser.evaluate(column) == ["0", "50", "100"]
    browser.evaluate(f"{table}.tHead.rows[0].cells[0].click()")
    assert browser.evaluate(column) == ["0", "50", "100"]  # ascending, numerically (not "0", "100", "50")
    browser.evaluate(f"{table}.tHead.rows[0].cells[0].click()")
    assert browser.evaluate(column) == ["100", "50", "0"]
