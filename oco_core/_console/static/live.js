// The live view's updates: server-sent events "message" (a new matched message: a row at
// the top) and "reply" (its callback's first reply: the row's duration). Without
// JavaScript the page still lists the recent messages, rendered by the server.
(function () {
  "use strict";
  var table = document.getElementById("live");
  if (!table || !window.EventSource) {
    return;
  }
  var rows = document.getElementById("live-rows");
  var status = document.getElementById("live-status");
  var size = parseInt(table.getAttribute("data-size"), 10) || 200;
  var after = table.getAttribute("data-last") || "0";
  var url = table.getAttribute("data-stream") + "?after=" + encodeURIComponent(after);
  // The oldest row still without a reply: the stream tells its reply if it came meanwhile.
  var waiting = null;
  Array.prototype.forEach.call(document.querySelectorAll("#live-rows tr.live-message"), function (tr) {
    if (tr.querySelector("td.duration").textContent.trim() === "") {
      waiting = tr.getAttribute("data-entry");
    }
  });
  if (waiting !== null) {
    url += "&waiting=" + encodeURIComponent(waiting);
  }
  var hidden = table.getAttribute("data-bodies") !== "shown";
  var source = new EventSource(url);

  function cell(name, text) {
    var td = document.createElement("td");
    td.className = name;
    td.textContent = text;
    return td;
  }

  function duration(entry) {
    return entry.duration_ms === null ? "" : entry.duration_ms + " ms";
  }

  function row(id) {
    return rows.querySelector('tr[data-entry="' + id + '"]');
  }

  source.addEventListener("open", function () {
    status.textContent = "Live: new messages appear at the top.";
  });
  source.addEventListener("error", function () {
    status.textContent = "Live updates paused; retrying.";
  });
  source.addEventListener("message", function (event) {
    var entry = JSON.parse(event.data);
    if (row(entry.id)) {
      return;
    }
    var tr = document.createElement("tr");
    tr.className = "live-message fresh";
    tr.setAttribute("data-entry", String(entry.id));
    var when = cell("when", "");
    var time = document.createElement("time");
    time.setAttribute("datetime", entry.iso);
    time.textContent = entry.time;
    when.appendChild(time);
    tr.appendChild(when);
    tr.appendChild(cell("adapter", entry.adapter));
    tr.appendChild(cell("room", entry.room || "(private)"));
    tr.appendChild(cell("user", entry.user));
    tr.appendChild(cell("route", entry.route));
    tr.appendChild(cell("callback", entry.callback));
    tr.appendChild(cell("duration number", duration(entry)));
    tr.appendChild(cell(entry.body === "hidden" && hidden ? "body hidden-body" : "body", entry.body));
    rows.insertBefore(tr, rows.firstChild);
    while (rows.children.length > size) {
      rows.removeChild(rows.lastChild);
    }
    var empty = document.getElementById("live-empty");
    if (empty) {
      empty.remove();
    }
  });
  source.addEventListener("reply", function (event) {
    var entry = JSON.parse(event.data);
    var tr = row(entry.id);
    if (tr) {
      tr.querySelector("td.duration").textContent = duration(entry);
    }
  });
})();
