// saev visuals explorer: builds the latent table from window.SAEV (data.js), sorts it by a
// column header and filters it by latent id. Plain JS so the page works from file:// offline.
(function () {
  "use strict";
  const data = window.SAEV;
  const tbody = document.querySelector("#latents tbody");
  const search = document.getElementById("search");
  const status = document.getElementById("status");
  const rendered = new Set(data.latents.map((l) => l.id));
  let sortKey = "freq";
  let descending = true;

  function fmt(x, sci) {
    if (x === 0) return "0";
    return sci ? x.toExponential(2) : x.toPrecision(3);
  }

  function row(l) {
    const tr = document.createElement("tr");
    tr.dataset.id = String(l.id);
    const href = "latents/" + l.id + ".html";
    const thumbs = l.thumbs
      .map((src) => '<img loading="lazy" alt="" src="' + src + '">')
      .join("");
    tr.innerHTML =
      '<td><a href="' + href + '">' + l.id + "</a></td>" +
      '<td class="num">' + fmt(l.freq, true) + "</td>" +
      '<td class="num">' + fmt(l.mean, false) + "</td>" +
      '<td class="num">' + fmt(l.max, false) + "</td>" +
      '<td><a class="strip" href="' + href + '">' + thumbs + "</a></td>";
    return tr;
  }

  function draw() {
    const sign = descending ? -1 : 1;
    const rows = data.latents.slice().sort((a, b) => sign * (a[sortKey] - b[sortKey]) || a.id - b.id);
    tbody.replaceChildren(...rows.map(row));
    document.querySelectorAll("th.sortable").forEach((th) => {
      th.setAttribute("aria-sort", th.dataset.key === sortKey ? (descending ? "descending" : "ascending") : "none");
    });
    filter();
  }

  function filter() {
    const q = search.value.trim();
    let shown = 0;
    for (const tr of tbody.children) {
      const hit = q === "" || tr.dataset.id.startsWith(q);
      tr.hidden = !hit;
      shown += hit;
    }
    const id = Number(q);
    if (q !== "" && Number.isInteger(id) && !rendered.has(id)) {
      if (id >= 0 && id < data.all.freq.length) {
        status.textContent =
          "latent " + id + " was not rendered (freq " + fmt(data.all.freq[id], true) +
          ", mean " + fmt(data.all.mean[id], false) + ", max " + fmt(data.all.max[id], false) +
          "); rerun with --include-latents " + id + ".";
      } else {
        status.textContent = "no latent " + id + " (the SAE has " + data.all.freq.length + ").";
      }
    } else {
      status.textContent = shown + " of " + data.latents.length + " latents";
    }
  }

  document.querySelectorAll("th.sortable").forEach((th) => {
    th.addEventListener("click", () => {
      if (sortKey === th.dataset.key) descending = !descending;
      else [sortKey, descending] = [th.dataset.key, th.dataset.key !== "id"];
      draw();
    });
  });
  search.addEventListener("input", filter);
  search.addEventListener("keydown", (ev) => {
    const id = Number(search.value.trim());
    if (ev.key === "Enter" && rendered.has(id)) window.location.href = "latents/" + id + ".html";
  });
  draw();
})();
