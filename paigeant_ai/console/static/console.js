// Live parts of a page: each element with data-live="URL" is refreshed from URL every two seconds while the page
// is visible, until the server marks it ended (the header X-Paigeant-Ended). No third-party code, no build step.
"use strict";
(function () {
  const PERIOD_MS = 2000;

  async function refresh(element) {
    if (document.hidden || element.dataset.ended === "1") {
      return;
    }
    try {
      const response = await fetch(element.dataset.live, {credentials: "same-origin", cache: "no-store"});
      if (response.status === 303 || response.redirected) {
        window.location.reload();  // the session ended: the server sends the sign-in page
        return;
      }
      if (!response.ok) {
        return;
      }
      const html = await response.text();
      if (html !== element.dataset.last) {
        element.dataset.last = html;
        const open = Array.from(element.querySelectorAll("details[open][id]"), function (item) { return item.id; });
        element.innerHTML = html;
        for (const id of open) {  // what a person opened stays open as the part refreshes
          const item = document.getElementById(id);
          if (item !== null) {
            item.open = true;
          }
        }
      }
      if (response.headers.get("X-Paigeant-Ended") === "1") {
        element.dataset.ended = "1";
      }
      element.classList.remove("stale");
    } catch (error) {
      element.classList.add("stale");  // the console is unreachable for now: keep what is shown, and say so
    }
  }

  function start() {
    for (const element of document.querySelectorAll("[data-live]")) {
      window.setInterval(function () { refresh(element); }, PERIOD_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", start);
})();
