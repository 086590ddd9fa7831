"use strict";
// Sortable tables: click a column head; numbers (data-sort) before text, dashes last.
function sortKey(row, column) {
  const cell = row.cells[column];
  if (!cell) return [2, ""];
  if (cell.dataset.sort !== undefined && cell.dataset.sort !== "") return [0, parseFloat(cell.dataset.sort)];
  const text = cell.textContent.trim();
  return text === "\u2014" || text === "" ? [2, text] : [1, text.toLowerCase()];
}
function sortTable(head) {
  const table = head.closest("table");
  const column = Array.prototype.indexOf.call(head.parentNode.children, head);
  const ascending = head.getAttribute("aria-sort") !== "ascending";
  table.querySelectorAll("th").forEach(function (th) { th.removeAttribute("aria-sort"); });
  head.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort(function (a, b) {
    const x = sortKey(a, column), y = sortKey(b, column);
    if (x[0] !== y[0]) return x[0] - y[0];  // dashes stay last either way
    const order = x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0;
    return ascending ? order : -order;
  });
  rows.forEach(function (row) { body.appendChild(row); });
}
// Drill-down: a cell's link shows its run-and-task sample panel, filtered to the cell's breakdown values.
function showSamples(link) {
  const filters = JSON.parse(link.dataset.filters);
  document.querySelectorAll("section.samples").forEach(function (s) { s.hidden = true; });
  const panel = document.getElementById(link.dataset.panel);
  if (!panel) return;
  panel.hidden = false;
  let shown = 0;
  panel.querySelectorAll("tbody tr").forEach(function (row) {
    const values = JSON.parse(row.dataset.breakdown);
    const match = Object.keys(filters).every(function (key) { return values[key] === filters[key]; });
    row.hidden = !match;
    if (match) shown += 1;
  });
  panel.querySelector(".filter").textContent = link.dataset.caption + " \u2014 " + shown + " samples";
  panel.scrollIntoView();
}
document.addEventListener("click", function (event) {
  const head = event.target.closest("table.sortable thead th");
  if (head) { sortTable(head); return; }
  const link = event.target.closest("a.drill");
  if (link) { event.preventDefault(); showSamples(link); return; }
  const close = event.target.closest("button.close");
  if (close) close.closest("section.samples").hidden = true;
});
