// A small Markdown renderer that builds DOM nodes: model text only ever becomes text nodes
// (textContent), never HTML, so output such as <script> or <img onerror=...> is shown, not run.
// Supports paragraphs, line breaks, headings, block quotes, lists, fenced code blocks (an unclosed
// fence while streaming counts as open to the end), inline code, bold, italic and http(s) links.
"use strict";

const Markdown = (() => {
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // inline: `code`, **bold**, *italic* / _italic_, [text](http://...)
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*\n]+?)\*\*|\*([^*\s][^*\n]*?)\*|\b_([^_\n]+?)_\b|\[([^\]\n]+)\]\(([^)\s]+)\)/g;

  function safeUrl(url) {
    try {
      const u = new URL(url, window.location.href);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (e) {
      return null;
    }
  }

  function inline(text, parent) {
    let at = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > at) parent.append(document.createTextNode(text.slice(at, m.index)));
      if (m[1] !== undefined) parent.append(el("code", null, m[2]));
      else if (m[3] !== undefined) inline(m[3], parent.appendChild(el("strong")));
      else if (m[4] !== undefined) inline(m[4], parent.appendChild(el("em")));
      else if (m[5] !== undefined) inline(m[5], parent.appendChild(el("em")));
      else {
        const href = safeUrl(m[7]);
        if (href) {
          const a = el("a", null, m[6]);
          a.href = href;
          a.target = "_blank";
          a.rel = "noopener noreferrer nofollow";
          parent.append(a);
        } else {
          parent.append(document.createTextNode(m[0]));
        }
      }
      at = m.index + m[0].length;
    }
    if (at < text.length) parent.append(document.createTextNode(text.slice(at)));
  }

  function lines(parent, textLines) {
    textLines.forEach((line, i) => {
      if (i) parent.append(el("br"));
      inline(line, parent);
    });
  }

  const FENCE = /^\s*(```|~~~)\s*([\w+.-]*)\s*$/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const LIST = /^\s*([-*+]|\d+[.)])\s+(.*)$/;
  const QUOTE = /^\s*>\s?(.*)$/;

  function render(text, container) {
    const src = text.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < src.length) {
      const line = src[i];
      const fence = line.match(FENCE);
      if (fence) {
        const body = [];
        i++;
        while (i < src.length && !(src[i].trim().startsWith(fence[1]) && src[i].trim().replace(/[`~]/g, "") === "")) {
          body.push(src[i]);
          i++;
        }
        i++; // the closing fence (or past the end while it is still streaming)
        const pre = el("pre", "code-block");
        if (fence[2]) pre.dataset.lang = fence[2];
        pre.append(el("code", null, body.join("\n")));
        container.append(pre);
        continue;
      }
      if (!line.trim()) { i++; continue; }
      const heading = line.match(HEADING);
      if (heading) {
        inline(heading[2], container.appendChild(el("h" + Math.min(6, heading[1].length + 2))));
        i++;
        continue;
      }
      if (QUOTE.test(line)) {
        const body = [];
        while (i < src.length && QUOTE.test(src[i])) body.push(src[i++].match(QUOTE)[1]);
        render(body.join("\n"), container.appendChild(el("blockquote")));
        continue;
      }
      if (LIST.test(line)) {
        const ordered = /\d/.test(line.match(LIST)[1]);
        const list = container.appendChild(el(ordered ? "ol" : "ul"));
        while (i < src.length && LIST.test(src[i])) {
          lines(list.appendChild(el("li")), [src[i].match(LIST)[2]]);
          i++;
        }
        continue;
      }
      const para = [];
      while (i < src.length && src[i].trim() && !FENCE.test(src[i]) && !HEADING.test(src[i])
             && !LIST.test(src[i]) && !QUOTE.test(src[i])) {
        para.push(src[i]);
        i++;
      }
      lines(container.appendChild(el("p")), para);
    }
  }

  // The model's calculator calls arrive inline: <|python_start|>expr<|python_end|> and
  // <|output_start|>result<|output_end|>. Split a reply into text / call / output segments; a
  // segment still streaming (no end marker yet) runs to the end of the text.
  const MARK = /<\|(python_start|python_end|output_start|output_end)\|>/g;

  function segments(text) {
    const out = [];
    let kind = "text", at = 0;
    for (const m of text.matchAll(MARK)) {
      const chunk = text.slice(at, m.index);
      if (m[1] === "python_start" || m[1] === "output_start") {
        if (chunk) out.push({ kind, text: chunk });
        kind = m[1] === "python_start" ? "call" : "output";
      } else {
        out.push({ kind, text: chunk });
        kind = "text";
      }
      at = m.index + m[0].length;
    }
    if (at < text.length || kind !== "text") out.push({ kind, text: text.slice(at), open: kind !== "text" });
    return out;
  }

  function renderReply(text, container) {
    for (const seg of segments(text)) {
      if (seg.kind === "text") {
        render(seg.text, container);
        continue;
      }
      const box = container.appendChild(el("div", "tool " + (seg.kind === "call" ? "tool-call" : "tool-output")));
      box.append(el("span", "tool-label", seg.kind === "call" ? "calculator" : "result"));
      box.append(el("code", null, seg.text + (seg.open ? " …" : "")));
    }
  }

  return { render, renderReply, segments };
})();
