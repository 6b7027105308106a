// The audit page's live updates: records that match the filters arrive as server-sent
// events and are added at the top. Without JavaScript the page is the same, minus that.
(function () {
  "use strict";
  var table = document.getElementById("audit");
  if (!table || table.getAttribute("data-live") !== "on" || !window.EventSource) {
    return;
  }
  var rows = document.getElementById("audit-rows");
  var status = document.getElementById("audit-live");
  var columns = ["user", "callback", "kind", "decision", "room", "permission", "detail"];
  var source = new EventSource(table.getAttribute("data-stream"));

  function cell(name, text) {
    var td = document.createElement("td");
    td.className = name;
    td.textContent = text;
    return td;
  }

  source.addEventListener("open", function () {
    status.textContent = "Live: new records appear at the top.";
  });
  source.addEventListener("error", function () {
    status.textContent = "Live updates paused; retrying.";
  });
  source.addEventListener("record", function (event) {
    var record = JSON.parse(event.data);
    var tr = document.createElement("tr");
    tr.className = "audit-record fresh";
    var when = cell("when", "");
    var time = document.createElement("time");
    time.setAttribute("datetime", record.iso);
    time.textContent = record.when;
    when.appendChild(time);
    tr.appendChild(when);
    columns.forEach(function (name) {
      var td = cell(name, record[name] || "");
      if (name === "decision") {
        td.className += " decision-" + record.decision;
      }
      tr.appendChild(td);
    });
    rows.insertBefore(tr, rows.firstChild);
    var empty = document.getElementById("audit-empty");
    if (empty) {
      empty.remove();
    }
  });
})();
