/* Playground: chat with a base model, checkpoint or alias (GET /v1/models) through the OpenAI-compatible
   POST /v1/chat/completions with stream: true; the answer grows as its deltas arrive, and with "Token logprobs"
   its tokens show their logprobs on hover. `?model=` preselects a model (the "Chat" links). The conversation lives
   in the page only. */
"use strict";

(() => {
  const { $, el, api, stream, attempt } = Loom;
  let messages = [];

  async function loadModels() {
    const wanted = new URLSearchParams(window.location.search).get("model");
    const answer = await api("GET", "/v1/models");
    const ids = answer.data.map((card) => card.id);
    if (wanted && !ids.includes(wanted)) ids.push(wanted);
    $("#model").replaceChildren(...ids.map((id) => el("option", { value: id, text: id, selected: id === wanted })));
  }

  function turn(role, text) {
    const body = el("div", { class: "text", text });
    const label = el("span", { class: "role", text: role });
    const item = el("li", { class: `turn ${role}`, "data-role": role }, label, body);
    $("#transcript").append(item);
    return item;
  }

  /* The answer's tokens, each showing its logprob on hover (and in its accessible name). */
  function tokenView(tokens) {
    const mean = tokens.reduce((sum, t) => sum + t.logprob, 0) / tokens.length;
    const spans = tokens.map((t) => {
      const logprob = `logprob ${t.logprob.toFixed(3)}`;
      return el("span", { class: "token", title: logprob, "aria-label": `${t.token} (${logprob})`, text: t.token });
    });
    return el("details", { class: "tokens" },
      el("summary", { text: `${tokens.length} tokens, mean logprob ${mean.toFixed(3)}` }), el("div", {}, ...spans));
  }

  async function send() {
    const content = $("#message").value.trim();
    if (!content) return;
    $("#message").value = "";
    messages.push({ role: "user", content });
    turn("user", content);
    const answer = turn("assistant", "");
    answer.dataset.state = "streaming";
    const text = answer.querySelector(".text");
    const tokens = [];
    $("#send").disabled = true;
    try {
      await stream("/v1/chat/completions", {
        model: $("#model").value,
        messages,
        stream: true,
        temperature: Number($("#temperature").value),
        max_tokens: Number($("#max-tokens").value),
        logprobs: $("#show-logprobs").checked,
      }, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = (chunk.choices || [])[0] || {};
        if (choice.delta && choice.delta.content) text.textContent += choice.delta.content;
        if (choice.logprobs && choice.logprobs.content) tokens.push(...choice.logprobs.content);
      });
      messages.push({ role: "assistant", content: text.textContent });
      if (tokens.length) answer.append(tokenView(tokens));
      answer.dataset.state = "done";
    } catch (error) {
      messages.pop();
      answer.dataset.state = "failed";
      text.textContent = `(failed: ${error.message})`;
    } finally {
      $("#send").disabled = false;
      $("#message").focus();
    }
  }

  Loom.onSignedIn(() => {
    $("#chat-form").addEventListener("submit", (event) => {
      event.preventDefault();
      send();
    });
    $("#message").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && event.ctrlKey) {
        event.preventDefault();
        send();
      }
    });
    $("#new-chat").addEventListener("click", () => {
      messages = [];
      $("#transcript").replaceChildren();
      $("#message").focus();
    });
    attempt(loadModels);
  });
})();
