// webhookd's pages: live refresh of the parts marked data-live, and confirmations.
// Everything works without this file; it only saves a reload and asks before a skip.
"use strict";

(function () {
  var seconds = Number(document.body.dataset.refresh || 0);

  function refresh() {
    if (document.hidden) return;
    fetch(window.location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (!response.ok || response.redirected) return null;
        return response.text();
      })
      .then(function (text) {
        if (text === null) return;
        var fresh = new DOMParser().parseFromString(text, "text/html");
        document.querySelectorAll("[data-live][id]").forEach(function (old) {
          var replacement = fresh.getElementById(old.id);
          if (replacement) old.replaceWith(document.importNode(replacement, true));
        });
      })
      .catch(function () {});
  }

  if (seconds > 0) window.setInterval(refresh, seconds * 1000);

  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm)) {
        event.preventDefault();
        return;
      }
      var field = form.querySelector("input[name=confirm]");
      if (field) field.value = "yes";
    });
  });
})();
