/* Playground: chat with a base model, checkpoint or alias (GET /v1/models) through the OpenAI-compatible
   POST /v1/chat/completions with stream: true; the answer grows as its deltas arrive. `?model=` preselects a model
   (the runs page's "Chat" links). The conversation lives in the page only. */
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

  async function send() {
    const content = $("#message").value.trim();
    if (!content) return;
    $("#message").value = "";
    messages.push({ role: "user", content });
    turn("user", content);
    const answer = turn("assistant", "");
    answer.dataset.state = "streaming";
    const text = answer.querySelector(".text");
    $("#send").disabled = true;
    try {
      await stream("/v1/chat/completions", {
        model: $("#model").value,
        messages,
        stream: true,
        temperature: Number($("#temperature").value),
        max_tokens: Number($("#max-tokens").value),
      }, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) text.textContent += delta.content;
      });
      messages.push({ role: "assistant", content: text.textContent });
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
