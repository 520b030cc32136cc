"""The web page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium against a real in-process server.

Pastes a sequence and finds its self-hit row; runs a search from a ``/?q=`` link;
shows a bad record's error next to the input; sorts columns; shows an E-value column
when the hits carry E-values; downloads exactly the server's JSON and TSV; reads an
uploaded gzip FASTA; asks for a token when the server needs one; and loads nothing
from other hosts. The paste test saves a screenshot (``web_page.png`` in its pytest
temporary directory; with ``ESMSEARCH_SCREENSHOT=PATH``, also at PATH -- the README's
``docs/images/web_page.png`` is made that way).

Chromium runs with ``--disable-background-networking`` and friends: the test machines
have no network, and Chromium's own update and sync traffic would otherwise stall it.
Waits are Selenium's ``WebDriverWait`` on a condition of the page, never sleeps.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from esmsearch.sequences import SequenceRecord, read_fasta
from esmsearch.server import BatchingConfig, SearchServer, ServerConfig, create_server
from esmsearch.server.security import SecurityConfig

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: No sandbox (CI runs as root), no GPU, no /dev/shm (small in containers), and none of
#: Chromium's own network traffic (no network here: it would hang waiting for it).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)
TOKEN = "page-token-0123456789abcdef"
WAIT_S = 60


@dataclass
class Browser:
    driver: webdriver.Chrome
    downloads: Path

    def wait(self, condition: Callable[[webdriver.Chrome], Any], timeout_s: float = WAIT_S) -> Any:
        return WebDriverWait(self.driver, timeout_s).until(condition)

    def by_id(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def js_errors(self) -> list[str]:
        """Console errors other than the failed requests a test provokes on purpose."""
        return [
            e["message"]
            for e in self.driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
        ]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"{missing} not found: apt-get install chromium chromium-driver (as .ci/run does)")
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        yield Browser(driver, downloads)
    finally:
        driver.quit()


def _serve(small_index: Path, **kw: Any) -> SearchServer:
    srv, _ = create_server(
        ServerConfig(
            index=small_index,
            port=0,
            http_port=0,
            device="cpu",
            max_workers=4,
            batching=BatchingConfig(enabled=False),
            **kw,
        )
    )
    return srv


@pytest.fixture(scope="module")
def site(small_index: Path) -> Iterator[str]:
    srv = _serve(small_index)
    try:
        yield f"http://127.0.0.1:{srv.http_port}"
    finally:
        srv.stop(1.0)


@pytest.fixture(scope="module")
def db(ecoli_fasta: Path) -> list[SequenceRecord]:
    return list(read_fasta(ecoli_fasta))


@pytest.fixture()
def page(browser: Browser, site: str) -> Iterator[Browser]:
    """The page loaded, with the index information shown in its header."""
    browser.driver.get(site + "/")
    browser.wait(lambda d: "40 sequences" in d.find_element(By.ID, "index-info").text)
    yield browser
    assert browser.js_errors() == []


#: The rows of a results table as objects keyed by column header (one WebDriver call).
ROWS_JS = """
const table = arguments[0];
const headers = [...table.querySelectorAll("thead th")].map((th) => th.textContent.trim());
return [...table.querySelectorAll("tbody tr")].map((tr) =>
  Object.fromEntries([...tr.children].map((td, i) => [headers[i], td.textContent])));
"""


def _rows(browser: Browser, query_id: str | None = None) -> list[dict[str, str]]:
    """The result table (of ``query_id``, else the first) as dicts keyed by column header."""
    scope = f'section.query-result[data-query-id="{query_id}"] ' if query_id else ""
    table = browser.driver.find_element(By.CSS_SELECTOR, scope + "table.hits")
    rows = browser.driver.execute_script(ROWS_JS, table)
    assert isinstance(rows, list)
    return rows


def _wait_for_results(browser: Browser, n_queries: int) -> None:
    browser.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "section.query-result table.hits")) == n_queries)


def _search(browser: Browser, text: str, k: int = 10) -> None:
    query = browser.by_id("query")
    query.clear()
    query.send_keys(text)
    k_field = browser.by_id("k")
    k_field.clear()
    k_field.send_keys(str(k))
    browser.by_id("submit").click()


def _wrapped(sequence: str, width: int = 60) -> str:
    return "\n".join(sequence[i : i + width] for i in range(0, len(sequence), width))


def test_paste_a_sequence_and_find_its_self_hit(page: Browser, db: list[SequenceRecord], tmp_path: Path) -> None:
    record = db[12]
    _search(page, _wrapped(record.sequence), k=10)
    _wait_for_results(page, 1)
    rows = _rows(page, "query_1")
    assert len(rows) == 10
    assert rows[0]["#"] == "1" and rows[0]["Target"] == record.record_id
    assert rows[0]["Cosine score"] == "1.0000" and rows[0]["Length"] == str(len(record.sequence))
    assert rows[0]["Description"] == record.description
    evalues = [float(r["E-value"]) for r in rows]  # the index has decoys: an E-value per hit
    assert evalues[0] == min(evalues) and evalues == sorted(evalues)  # the self-hit is the most significant
    assert "index version" in page.by_id("status").text
    shot = tmp_path / "web_page.png"
    assert page.driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("ESMSEARCH_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["ESMSEARCH_SCREENSHOT"])


def test_a_query_link_runs_the_search_on_load(browser: Browser, site: str, db: list[SequenceRecord]) -> None:
    records = [db[4], db[21]]
    fasta = "".join(f">{r.record_id} {r.description}\n{_wrapped(r.sequence)}\n" for r in records)
    browser.driver.get(f"{site}/?q={quote(fasta)}&k=5")
    _wait_for_results(browser, 2)
    for record in records:
        rows = _rows(browser, record.record_id)
        assert len(rows) == 5
        assert rows[0]["Target"] == record.record_id and rows[0]["#"] == "1"
    assert browser.by_id("query").get_attribute("value") == fasta
    assert browser.by_id("k").get_attribute("value") == "5"
    # The link on the page reproduces the search.
    link = browser.by_id("share-link").get_attribute("href")
    assert link is not None and urlsplit(link).query == urlsplit(browser.driver.current_url).query
    assert browser.js_errors() == []


def test_a_bad_record_is_named_next_to_the_input(page: Browser) -> None:
    _search(page, ">good first\nMKTAYIAK\n>bad second\nMKJAYIAK\n")
    error = page.wait(
        lambda d: d.find_element(By.ID, "query-error") if d.find_element(By.ID, "query-error").is_displayed() else None
    )
    assert "'bad'" in error.text and "residue 3" in error.text and "'J'" in error.text
    assert error.get_attribute("data-record-id") == "bad"
    assert page.by_id("query").get_attribute("aria-invalid") == "true"
    assert page.driver.find_elements(By.CSS_SELECTOR, "table.hits") == []


def _click_header(browser: Browser, label: str) -> None:
    browser.driver.find_element(By.XPATH, f'//table[@class="hits"]//th/button[text()="{label}"]').click()


def _column(browser: Browser, name: str) -> list[str]:
    return [row[name] for row in _rows(browser)]


def test_columns_sort_by_number_or_text_both_ways(page: Browser, db: list[SequenceRecord]) -> None:
    _search(page, db[7].sequence, k=12)
    _wait_for_results(page, 1)
    _click_header(page, "Length")
    lengths = [int(x) for x in _column(page, "Length")]
    assert lengths == sorted(lengths) and len(set(lengths)) > 1
    _click_header(page, "Length")
    assert [int(x) for x in _column(page, "Length")] == sorted(lengths, reverse=True)
    _click_header(page, "Target")
    assert _column(page, "Target") == sorted(_column(page, "Target"), key=lambda s: s.lower())
    _click_header(page, "Cosine score")  # higher is closer: descending first
    scores = [float(x) for x in _column(page, "Cosine score")]
    assert scores == sorted(scores, reverse=True)
    assert _column(page, "#") == [str(i) for i in range(1, 13)]


#: Installed in the page before a search: adds an ``evalue`` to every hit the server
#: returns, as a server with E-values does (``arguments[0]``: E-values or only nulls),
#: so that the column logic is tested before the server computes E-values.
ADD_EVALUES = """
const withValues = arguments[0];
const original = window.fetch;
window.fetch = async (url, init) => {
  const response = await original(url, init);
  if (String(url) !== "v1/search" || !response.ok) return response;
  const results = await response.json();
  for (const result of results) {
    result.hits.forEach((hit, i) => {
      hit.evalue = withValues && i !== 1 ? Math.pow(10, -(i * 7 % 11)) * 3 : null;
    });
  }
  return new Response(JSON.stringify(results, null, 2), {status: 200, headers: {"Content-Type": "application/json"}});
};
"""


def test_an_evalue_column_appears_and_sorts_when_hits_carry_evalues(page: Browser, db: list[SequenceRecord]) -> None:
    page.driver.execute_script(ADD_EVALUES, True)
    _search(page, db[3].sequence, k=6)
    _wait_for_results(page, 1)
    rows = _rows(page)
    assert [r["E-value"] for r in rows] == ["3.0", "\u2013", "3.0e-3", "3.0e-10", "3.0e-6", "0.030"]
    headers = [th.text for th in page.driver.find_elements(By.CSS_SELECTOR, "table.hits thead th")]
    assert headers.index("E-value") == headers.index("Cosine score") + 1
    _click_header(page, "E-value")  # most significant first, no E-value last
    assert _column(page, "E-value") == ["3.0e-10", "3.0e-6", "3.0e-3", "0.030", "3.0", "\u2013"]


def test_no_evalue_column_when_every_evalue_is_null(page: Browser, db: list[SequenceRecord]) -> None:
    page.driver.execute_script(ADD_EVALUES, False)  # an index without decoys
    _search(page, db[3].sequence, k=3)
    _wait_for_results(page, 1)
    headers = [th.text for th in page.driver.find_elements(By.CSS_SELECTOR, "table.hits thead th")]
    assert [h.strip(" \u25b2\u25bc") for h in headers] == ["#", "Target", "Description", "Cosine score", "Length"]
    assert len(_rows(page)) == 3


def _downloaded(browser: Browser, name: str) -> str:
    path = browser.downloads / name
    browser.wait(lambda _d: path.exists() and not path.with_name(name + ".crdownload").exists())
    return path.read_text(encoding="utf-8")


def test_downloads_are_exactly_the_servers_json_and_tsv(page: Browser, site: str, db: list[SequenceRecord]) -> None:
    for name in ("esmsearch_hits.json", "esmsearch_hits.tsv"):
        (page.downloads / name).unlink(missing_ok=True)
    fasta = f">{db[1].record_id}\n{db[1].sequence}\n>{db[2].record_id}\n{db[2].sequence}\n"
    _search(page, fasta, k=3)
    _wait_for_results(page, 2)
    page.by_id("download-json").click()
    got_json = _downloaded(page, "esmsearch_hits.json")
    page.by_id("download-tsv").click()
    got_tsv = _downloaded(page, "esmsearch_hits.tsv")
    body = {"fasta": fasta, "k": 3}
    with httpx.Client(base_url=site, timeout=60) as api:
        assert got_json == api.post("/v1/search", json=body).text
        assert got_tsv == api.post("/v1/search?format=tsv", json=body).text
    assert [r["query_id"] for r in json.loads(got_json)] == [db[1].record_id, db[2].record_id]
    assert len(got_tsv.splitlines()) == 1 + 2 * 3


def test_an_uploaded_gzip_fasta_fills_the_query(page: Browser, db: list[SequenceRecord], tmp_path: Path) -> None:
    records: Sequence[SequenceRecord] = [db[25], db[33]]
    fasta = "".join(f">{r.record_id} {r.description}\n{_wrapped(r.sequence)}\n" for r in records)
    upload = tmp_path / "queries.fasta.gz"
    upload.write_bytes(gzip.compress(fasta.encode(), mtime=0))
    page.by_id("file").send_keys(str(upload))
    page.wait(lambda d: d.find_element(By.ID, "query").get_attribute("value") == fasta)
    page.by_id("submit").click()
    _wait_for_results(page, 2)
    assert [_rows(page, r.record_id)[0]["Target"] for r in records] == [r.record_id for r in records]


def test_a_server_with_tokens_gets_a_token_field(browser: Browser, small_index: Path, db: list[SequenceRecord]) -> None:
    srv = _serve(small_index, security=SecurityConfig(tokens=frozenset({TOKEN})))
    try:
        site = f"http://127.0.0.1:{srv.http_port}"
        browser.driver.get(f"{site}/?q={quote(db[6].sequence)}&k=2")
        browser.wait(lambda d: d.find_element(By.ID, "token-label").is_displayed())
        assert "needs a bearer token" in browser.by_id("index-info").text
        assert "enter the token" in browser.by_id("status").text
        browser.by_id("token").send_keys("wrong-token-0123456789")
        browser.by_id("submit").click()
        browser.wait(lambda d: "refused" in d.find_element(By.ID, "index-info").text)
        token = browser.by_id("token")
        token.clear()
        token.send_keys(TOKEN)
        browser.by_id("submit").click()  # the linked search runs with the token
        _wait_for_results(browser, 1)
        assert _rows(browser)[0]["Target"] == db[6].record_id
        assert "40 sequences" in browser.by_id("index-info").text
        assert not browser.by_id("token-label").is_displayed()
        assert browser.js_errors() == []
    finally:
        browser.driver.execute_script("sessionStorage.clear()")
        srv.stop(1.0)


def _resource_hosts(browser: Browser) -> set[str]:
    names = browser.driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return {urlsplit(n).netloc for n in names}


def test_the_page_and_the_docs_load_nothing_from_other_hosts(
    page: Browser, site: str, db: list[SequenceRecord]
) -> None:
    _search(page, db[0].sequence, k=2)
    _wait_for_results(page, 1)
    own = urlsplit(site).netloc
    assert _resource_hosts(page) == {own}
    page.driver.get(site + "/docs")
    page.wait(lambda d: "/v1/search" in d.find_element(By.TAG_NAME, "body").text)  # Swagger UI rendered
    assert _resource_hosts(page) == {own}
