// Handrail console: live regions (server-sent events), relative times, keyboard shortcuts. No inline script
// anywhere (the CSP forbids it): everything the pages run is in this file and htmx.min.js.
(function () {
  "use strict";

  function relative(ms) {
    var s = Math.round((Date.now() - ms) / 1000);
    if (s < 0) {  // to come: an approval's expiry
      s = -s;
      if (s < 60) return "in " + s + " s";
      if (s < 3600) return "in " + Math.floor(s / 60) + " min";
      if (s < 86400) return "in " + Math.floor(s / 3600) + " h";
      return "in " + Math.floor(s / 86400) + " d";
    }
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h ago";
    return Math.floor(s / 86400) + " d ago";
  }

  function times(root) {
    root.querySelectorAll("time[data-at]").forEach(function (t) {
      var at = Number(t.dataset.at);
      if (!t.dataset.abs) t.dataset.abs = t.textContent;
      t.textContent = relative(at);
      t.title = t.dataset.abs;
    });
  }

  function busy(el) {
    // someone is typing in this region: do not replace it under their hands
    var a = document.activeElement;
    return a && el.contains(a) && /^(INPUT|TEXTAREA|SELECT)$/.test(a.tagName) && a.value !== a.defaultValue;
  }

  function refresh(el) {
    if (busy(el)) { el.dataset.stale = "1"; return; }
    delete el.dataset.stale;
    if (el.dataset.reload === "page") { window.location.reload(); return; }
    htmx.ajax("GET", el.dataset.src, { target: el, swap: "innerHTML" });
  }

  function watch(el) {
    var url = "/console/events?watch=" + encodeURIComponent(el.dataset.watch) +
      "&since=" + encodeURIComponent(el.dataset.since || "");
    var source = new EventSource(url);
    source.addEventListener("changed", function () { refresh(el); });
    el.addEventListener("focusout", function () {
      if (el.dataset.stale) setTimeout(function () { refresh(el); }, 0);
    });
  }

  function scroll(el) {
    if (el.dataset.scroll === "bottom") window.scrollTo(0, document.body.scrollHeight);
  }

  function typing(e) {
    var t = e.target;
    return t && (/^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName) || t.isContentEditable);
  }

  document.addEventListener("keydown", function (e) {
    // a: approve, r: reject (the reason field first) -- on the first approval card that can be decided
    if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    var form = document.querySelector("form.decide");
    if (!form) return;
    if (e.key === "a") { e.preventDefault(); form.querySelector("button.approve").click(); }
    if (e.key === "r") {
      e.preventDefault();
      var reason = form.querySelector("input[name=reason]");
      if (reason.value.trim()) form.querySelector("button.reject").click(); else reason.focus();
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    times(document);
    document.querySelectorAll("[data-watch]").forEach(watch);
    document.querySelectorAll("[data-scroll]").forEach(scroll);
    setInterval(function () { times(document); }, 30000);
  });

  document.addEventListener("htmx:afterSwap", function (e) {
    times(e.detail.target);
    if (e.detail.target.dataset && e.detail.target.dataset.scroll) scroll(e.detail.target);
  });
})();
