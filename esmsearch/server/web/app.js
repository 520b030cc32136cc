// The esmsearch web page: paste or upload queries, search through the HTTP API, show,
// sort and download the hits. Plain JavaScript, no libraries, nothing fetched from
// anywhere but this server. The JSON it reads is what `esmsearch search --format json`
// prints: [{query_id, query_length, index_version, hits: [{target_id, cosine_score,
// rank, target_length, target_description, evalue?}]}].
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "esmsearch-token";
  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    lastBody: null, // the request body of the results on show
    lastJson: "", // the server's JSON answer, byte for byte (the JSON download)
  };

  // -- helpers --------------------------------------------------------------------------

  function headers(extra) {
    const h = Object.assign({}, extra);
    if (state.token) h["Authorization"] = "Bearer " + state.token;
    return h;
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  function showError(error) {
    const box = $("query-error");
    box.textContent = error.message || String(error);
    if (error.record_id) box.dataset.recordId = error.record_id;
    else delete box.dataset.recordId;
    if (error.code) box.dataset.code = error.code;
    else delete box.dataset.code;
    box.hidden = false;
    $("query").setAttribute("aria-invalid", "true");
    setStatus("");
  }

  function clearError() {
    const box = $("query-error");
    box.hidden = true;
    box.textContent = "";
    delete box.dataset.recordId;
    delete box.dataset.code;
    $("query").removeAttribute("aria-invalid");
  }

  function showTokenField(message) {
    $("token-label").hidden = false;
    $("token").focus();
    if (message) $("index-info").textContent = message;
  }

  async function errorOf(response) {
    const text = await response.text();
    try {
      const error = JSON.parse(text);
      if (error && typeof error.message === "string") return error;
    } catch (_) {
      // not JSON: fall through
    }
    return { code: String(response.status), message: `HTTP ${response.status}: ${text.slice(0, 300)}` };
  }

  function download(name, type, text) {
    const url = URL.createObjectURL(new Blob([text], { type }));
    const a = document.createElement("a");
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  // -- index information ------------------------------------------------------------------

  async function loadIndexInfo() {
    let response;
    try {
      response = await fetch("v1/index", { headers: headers({ Accept: "application/json" }) });
    } catch (err) {
      $("index-info").textContent = "cannot reach the server: " + err;
      return false;
    }
    if (response.status === 401) {
      showTokenField(state.token ? "the token was refused: enter a valid one" : "this server needs a bearer token: enter it below");
      return false;
    }
    if (!response.ok) {
      $("index-info").textContent = (await errorOf(response)).message;
      return false;
    }
    const info = await response.json();
    const count = Number(info.count).toLocaleString("en-US");
    $("index-info").textContent =
      `model ${info.model_name} (layer ${info.layer}, dim ${info.dim}) \u00b7 index version ${info.index_version} \u00b7 ${count} sequences`;
    $("index-info").dataset.indexVersion = info.index_version;
    if (info.limits && info.limits.max_k) $("k").max = String(info.limits.max_k);
    return true;
  }

  // -- search -----------------------------------------------------------------------------

  function requestBody() {
    const text = $("query").value;
    if (!text.trim()) throw new Error("paste a FASTA record or a protein sequence first, or upload a FASTA file");
    const kText = $("k").value.trim();
    if (!/^\d+$/.test(kText)) throw new Error(`hits per query (k) must be a whole number, got '${kText}'`);
    const body = { fasta: text, k: Number(kText) };
    for (const [id, key, what] of [
      ["max-evalue", "max_evalue", "Max E-value"],
      ["min-score", "min_score", "Min cosine score"],
    ]) {
      const value = $(id).value.trim();
      if (value === "") continue;
      const number = Number(value);
      if (!Number.isFinite(number)) throw new Error(`${what} must be a number, got '${value}'`);
      body[key] = number;
    }
    return body;
  }

  function shareUrl(body) {
    const params = new URLSearchParams({ q: body.fasta, k: String(body.k) });
    if (body.max_evalue !== undefined) params.set("max_evalue", String(body.max_evalue));
    if (body.min_score !== undefined) params.set("min_score", String(body.min_score));
    return "?" + params.toString();
  }

  async function post(body, accept, format) {
    const url = format ? `v1/search?format=${format}` : "v1/search";
    return fetch(url, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: accept }),
      body: JSON.stringify(body),
    });
  }

  async function search(body) {
    clearError();
    $("submit").disabled = true;
    setStatus("searching\u2026");
    try {
      let response;
      try {
        response = await post(body, "application/json");
      } catch (err) {
        showError({ message: "cannot reach the server: " + err });
        return;
      }
      if (!response.ok) {
        const error = await errorOf(response);
        if (response.status === 401) showTokenField("this server needs a bearer token: enter it below");
        if (response.status === 429) {
          const wait = response.headers.get("Retry-After");
          if (wait) error.message += ` (server busy: retry in ${wait} s)`;
        }
        showError(error);
        return;
      }
      const text = await response.text();
      const results = JSON.parse(text);
      state.lastBody = body;
      state.lastJson = text;
      render(results);
      const link = shareUrl(body);
      $("share-link").href = link;
      history.replaceState(null, "", link);
      const hits = results.reduce((n, r) => n + r.hits.length, 0);
      const version = results.length ? results[0].index_version : "";
      setStatus(`${results.length} ${results.length === 1 ? "query" : "queries"}, ${hits} hits (index version ${version})`);
    } finally {
      $("submit").disabled = false;
    }
  }

  // -- results ----------------------------------------------------------------------------

  function formatEvalue(value) {
    if (value === null || value === undefined) return "\u2013";
    if (value === 0) return "0";
    // Two significant digits; scientific notation below 0.01, as BLAST's web output does.
    return value < 1e-2 || value >= 1e4 ? value.toExponential(1) : value.toPrecision(2);
  }

  function columnsFor(results) {
    const columns = [
      { key: "rank", label: "#", type: "num", text: (h) => String(h.rank) },
      { key: "target_id", label: "Target", type: "text", text: (h) => h.target_id },
      { key: "target_description", label: "Description", type: "text", text: (h) => h.target_description },
      { key: "cosine_score", label: "Cosine score", type: "num", text: (h) => h.cosine_score.toFixed(4) },
    ];
    // Shown whenever the hits carry E-values (an index without decoys sends none, or nulls).
    if (results.some((r) => r.hits.some((h) => typeof h.evalue === "number"))) {
      columns.push({ key: "evalue", label: "E-value", type: "num", text: (h) => formatEvalue(h.evalue) });
    }
    columns.push({ key: "target_length", label: "Length", type: "num", text: (h) => String(h.target_length) });
    return columns;
  }

  function compare(a, b, column) {
    const x = a[column.key];
    const y = b[column.key];
    if (column.type === "num") {
      const nx = x === null || x === undefined ? Infinity : x;
      const ny = y === null || y === undefined ? Infinity : y;
      return nx - ny;
    }
    return String(x).localeCompare(String(y));
  }

  function fillBody(tbody, hits, columns) {
    tbody.replaceChildren();
    for (const hit of hits) {
      const tr = document.createElement("tr");
      tr.dataset.targetId = hit.target_id;
      for (const column of columns) {
        const td = document.createElement("td");
        td.className = column.type === "num" ? "num " + column.key : column.key;
        td.textContent = column.text(hit);
        tr.appendChild(td);
      }
      tbody.appendChild(tr);
    }
  }

  function renderQuery(result, columns) {
    const section = document.createElement("section");
    section.className = "query-result";
    section.dataset.queryId = result.query_id;
    const h2 = document.createElement("h2");
    h2.textContent = result.query_id;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = ` \u00b7 ${result.query_length} residues \u00b7 ${result.hits.length} hits`;
    h2.appendChild(meta);
    section.appendChild(h2);
    if (!result.hits.length) {
      const p = document.createElement("p");
      p.textContent = "no hits (all below the cutoffs)";
      section.appendChild(p);
      return section;
    }
    const table = document.createElement("table");
    table.className = "hits";
    const thead = document.createElement("thead");
    const headRow = document.createElement("tr");
    const tbody = document.createElement("tbody");
    let sorted = { key: "rank", ascending: true };
    for (const column of columns) {
      const th = document.createElement("th");
      th.dataset.key = column.key;
      th.className = column.type === "num" ? "num" : "";
      th.setAttribute("aria-sort", column.key === "rank" ? "ascending" : "none");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = column.label;
      button.title = `sort by ${column.label}`;
      button.addEventListener("click", () => {
        const ascending = sorted.key === column.key ? !sorted.ascending : column.key !== "cosine_score";
        sorted = { key: column.key, ascending };
        const hits = result.hits.slice().sort((a, b) => (ascending ? 1 : -1) * compare(a, b, column));
        fillBody(tbody, hits, columns);
        for (const other of headRow.children) other.setAttribute("aria-sort", "none");
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      });
      th.appendChild(button);
      headRow.appendChild(th);
    }
    thead.appendChild(headRow);
    table.appendChild(thead);
    fillBody(tbody, result.hits, columns);
    table.appendChild(tbody);
    section.appendChild(table);
    return section;
  }

  function render(results) {
    const columns = columnsFor(results);
    const container = $("results");
    container.replaceChildren(...results.map((r) => renderQuery(r, columns)));
    $("downloads").hidden = results.length === 0;
  }

  // -- input ------------------------------------------------------------------------------

  async function readFile(file) {
    const head = new Uint8Array(await file.slice(0, 2).arrayBuffer());
    if (head[0] === 0x1f && head[1] === 0x8b) {
      // gzip, detected by content as the CLI does; DecompressionStream is built into browsers.
      const stream = file.stream().pipeThrough(new DecompressionStream("gzip"));
      return new Response(stream).text();
    }
    return file.text();
  }

  $("file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    clearError();
    try {
      $("query").value = await readFile(file);
      setStatus(`read ${file.name}`);
    } catch (err) {
      showError({ message: `cannot read ${file.name}: ${err}` });
    }
  });

  $("search-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!$("token-label").hidden) {
      state.token = $("token").value.trim();
      sessionStorage.setItem(TOKEN_KEY, state.token);
      if (!(await loadIndexInfo())) return;
      $("token-label").hidden = true;
    }
    let body;
    try {
      body = requestBody();
    } catch (err) {
      showError({ message: err.message });
      return;
    }
    await search(body);
  });

  $("download-json").addEventListener("click", () => {
    download("esmsearch_hits.json", "application/json", state.lastJson);
  });

  $("download-tsv").addEventListener("click", async () => {
    // The server writes the TSV, with the same code as `esmsearch search --format tsv`.
    const response = await post(state.lastBody, "text/tab-separated-values", "tsv");
    if (!response.ok) {
      showError(await errorOf(response));
      return;
    }
    download("esmsearch_hits.tsv", "text/tab-separated-values", await response.text());
  });

  // -- start: index info, then a /?q=...&k=... search if the link has one -------------------

  async function start() {
    const params = new URLSearchParams(location.search);
    const q = params.get("q");
    if (q !== null) {
      $("query").value = q;
      if (params.get("k")) $("k").value = params.get("k");
      if (params.get("max_evalue")) $("max-evalue").value = params.get("max_evalue");
      if (params.get("min_score")) $("min-score").value = params.get("min_score");
    }
    const ready = await loadIndexInfo();
    if (q !== null) {
      if (ready) {
        $("search-form").requestSubmit();
      } else if (!$("token-label").hidden) {
        setStatus("enter the token, then Search, to run the linked search");
      }
    }
  }

  start();
})();
