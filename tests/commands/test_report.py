"""lgca report on an output of real photos labelled by the pipeline, opened in headless Chromium."""
from __future__ import annotations

import os
from collections import Counter

import pytest

from pipeline.cli import main
from pipeline.commands.report import BINS, label_columns, write_report
from pipeline.config import QueryError, StorageConfig

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# What the page shows, read from its DOM (the data-* attributes the report writes beside its numbers).
READ_PAGE = """() => {
  const all = (sel) => [...document.querySelectorAll(sel)];
  const int = (v) => parseInt(v, 10);
  return {
    totals: Object.fromEntries(all("[data-total]").map(e => [e.dataset.total, int(e.textContent)])),
    labels: Object.fromEntries(all("table.bars tr[data-label]").map(
        r => [r.dataset.label, int(r.querySelector("[data-count]").textContent)])),
    reasons: Object.fromEntries(all("[data-reason]").map(e => [e.dataset.reason, int(e.textContent)])),
    histograms: Object.fromEntries(all("[data-histogram]").map(h => [h.dataset.histogram,
        [...h.querySelectorAll(".hist div")].map(b => int(b.dataset.count))])),
    pairs: Object.fromEntries(all("[data-pair]").map(e => [e.dataset.pair, [int(e.dataset.same), int(e.dataset.both)]])),
    galleries: Object.fromEntries(all("section[data-label]").map(s => [s.dataset.label, {
        count: int(s.dataset.count),
        lowest: [...s.querySelectorAll("[data-side=lowest] figure")].map(f => f.title),
        highest: [...s.querySelectorAll("[data-side=highest] figure")].map(f => f.title)}])),
    missing: Object.fromEntries(all("figure.missing").map(f => [f.title, f.querySelector(".reason").textContent])),
    images: all("img").map(i => ({complete: i.complete, width: i.naturalWidth})),
    errorRows: all("table.errors tr").length - 1,
  };
}"""


def browse(page_path, screenshot):
    """Open ``page_path`` in headless Chromium; returns what READ_PAGE reads, the console errors
    and uncaught exceptions, and the URLs the page requested. Saves a full-page screenshot."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium is needed at {CHROMIUM} for the report's browser test: apt-get install -y chromium "
                    "(.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    problems, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_path.as_uri(), wait_until="load")
            shown = page.evaluate(READ_PAGE)
            page.fill("#filter", "co")  # the label filter hides the galleries of other labels
            hidden = page.evaluate("() => [...document.querySelectorAll('section.hidden')].map(s => s.dataset.label)")
            page.fill("#filter", "")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return shown, problems, requests, hidden


def expected(rows: list[dict], per_class: int) -> dict:
    """The page's numbers computed independently from the rows pyarrow read."""
    ok = [r for r in rows if r["status"] == "ok"]
    columns = label_columns("lgca")
    names = list(columns)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = [r for r in ok if r[columns[a]] is not None and r[columns[b]] is not None]
            pairs[f"{a}|{b}"] = [sum(r[columns[a]] == r[columns[b]] for r in both), len(both)]
    galleries = {}
    for label in {r["label"] for r in ok}:
        mine = sorted((r for r in ok if r["label"] == label), key=lambda r: r["margin"])
        galleries[label] = {"count": len(mine), "lowest": [r["id"] for r in mine[:per_class]],
                            "highest": [r["id"] for r in mine[::-1][:per_class]]}
    return {"totals": {"rows": len(rows), "ok": len(ok), "errors": len(rows) - len(ok)},
            "labels": dict(Counter(r["label"] for r in ok)),
            "reasons": dict(Counter(r["error"].split(":", 1)[0] for r in rows if r["status"] == "error")),
            "pairs": pairs, "galleries": galleries}


def test_report_in_a_browser_shows_the_outputs_numbers(labelled, tmp_path, capsys):
    page_path = tmp_path / "report" / "report.html"
    assert main(["report", str(labelled.root), "-o", str(page_path), "--per-class", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{page_path}: 19 rows (17 ok, 2 error)")
    shown, problems, requests, hidden = browse(page_path, tmp_path / "report.png")

    rows = labelled.rows().to_pylist()
    want = expected(rows, per_class=2)
    assert problems == []  # no console error, no uncaught exception
    assert requests == [page_path.as_uri()]  # nothing but the page itself is fetched
    assert shown["totals"] == want["totals"] == {"rows": 19, "ok": 17, "errors": 2}
    assert shown["labels"] == want["labels"] and len(want["labels"]) >= 2
    assert shown["reasons"] == want["reasons"] == {"decode": 1, "empty file": 1}
    assert shown["errorRows"] == 2
    assert [len(counts) for counts in shown["histograms"].values()] == [BINS, BINS]
    assert sum(shown["histograms"]["score"]) == sum(shown["histograms"]["margin"]) == 17
    # the matrix shows each pair twice (a|b and b|a), both with the same counts
    assert shown["pairs"] == {**want["pairs"], **{"|".join(k.split("|")[::-1]): v for k, v in want["pairs"].items()}}
    assert shown["galleries"] == want["galleries"]
    assert len(shown["images"]) == sum(len(g["lowest"]) + len(g["highest"]) for g in want["galleries"].values())
    assert all(image["complete"] and image["width"] > 0 for image in shown["images"])  # placeholders too
    shown_ids = {i for g in want["galleries"].values() for i in g["lowest"] + g["highest"]}
    assert set(shown["missing"]) == {labelled.gone} & shown_ids  # only the deleted image is a placeholder
    assert all("read: FileNotFoundError" in reason for reason in shown["missing"].values())
    assert sorted(hidden) == sorted(label for label in want["labels"] if "co" not in label.lower())
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_where_selects_rows_and_shows_a_lost_image_as_a_placeholder(labelled, tmp_path):
    page_path = tmp_path / "gone.html"
    data = write_report(str(labelled.root), str(page_path), StorageConfig(), where=f"id = '{labelled.gone}'")
    assert data.totals == {"rows": 1, "ok": 1, "errors": 0}
    [gallery] = data.galleries
    assert [e.image_id for e in gallery.lowest] == [e.image_id for e in gallery.highest] == [labelled.gone]
    text = page_path.read_text()
    assert 'class="missing"' in text and "read: FileNotFoundError" in text and 'class="shown"' not in text
    tar_ids = [r["id"] for r in labelled.rows().to_pylist() if "#" in r["id"]]
    shard = write_report(str(labelled.root), str(tmp_path / "tar.html"), StorageConfig(), where="id LIKE '%#%'")
    assert sorted(e.image_id for g in shard.galleries for e in g.lowest) == sorted(tar_ids)
    assert 'class="missing"' not in (tmp_path / "tar.html").read_text()  # read from inside the tar shard


def test_report_refuses_a_bad_where(labelled, tmp_path):
    with pytest.raises(QueryError, match="--where 'no_such_column = 1'"):
        write_report(str(labelled.root), str(tmp_path / "x.html"), StorageConfig(), where="no_such_column = 1")
    assert not (tmp_path / "x.html").exists()
