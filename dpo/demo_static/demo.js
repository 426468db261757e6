// Tabs, example prompts, and generating without reloading the page. Without JavaScript both panels
// show and the form posts the page back, so all of this is a convenience.
(function () {
  "use strict";
  const roles = ["policy", "reference"];
  const panels = { generate: document.getElementById("panel-generate"), plots: document.getElementById("panel-plots") };
  const form = document.getElementById("generate-form");
  const results = document.getElementById("results");
  const error = document.getElementById("error");
  const status = document.getElementById("status");
  const button = document.getElementById("generate");

  function showTab(name) {
    if (!(name in panels)) name = "generate";
    for (const [key, panel] of Object.entries(panels)) {
      panel.hidden = key !== name;
      document.getElementById("tab-" + key).setAttribute("aria-selected", String(key === name));
    }
  }

  function showError(message) {
    error.textContent = message;
    error.hidden = !message;
  }

  function showRow(row) {
    for (const role of roles) {
      document.getElementById(role + "-output").textContent = row ? row[role] : "";
      const judge = document.getElementById(role + "-judge");
      const score = row && row["judge_" + role];
      if (judge) judge.textContent = typeof score === "number" ? score.toFixed(2) : row ? "none" : "";
    }
    const note = document.getElementById("judge-note");
    if (note) {
      note.textContent = row && row.judge_skipped ? "Not judged: " + row.judge_skipped : "";
      note.hidden = !note.textContent;
    }
  }

  function fieldsOfForm() {
    // Numbers go as typed: the server checks them and says what is wrong.
    const fields = { prompt: form.elements.prompt.value, greedy: form.elements.greedy.checked };
    for (const name of ["max_new_tokens", "temperature", "top_p", "seed"]) fields[name] = form.elements[name].value;
    return fields;
  }

  async function generate(event) {
    event.preventDefault();
    showError("");
    results.dataset.state = "busy";
    button.disabled = true;
    status.textContent = "Generating…";
    try {
      const response = await fetch("api/generate", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(fieldsOfForm()),
      });
      const answer = await response.json().catch(
        () => ({ error: "the server answered HTTP " + response.status + ": its terminal says why" }));
      if (!response.ok) throw new Error(answer.error || "the server answered HTTP " + response.status);
      showRow(answer);
      results.dataset.state = "done";
    } catch (failure) {
      showRow(null);
      results.dataset.state = "error";
      showError(failure instanceof TypeError ? "the demo server does not answer: is it still running?" : failure.message);
    } finally {
      button.disabled = false;
      status.textContent = "";
    }
  }

  for (const example of document.querySelectorAll("button.example")) {
    example.addEventListener("click", () => {
      form.elements.prompt.value = example.dataset.prompt;
      form.elements.prompt.focus();
    });
  }
  form.addEventListener("submit", generate);
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
  showTab(location.hash.slice(1));
})();
