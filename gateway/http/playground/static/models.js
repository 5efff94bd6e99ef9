// The model picker and what depends on the picked model: its language picker
// (multilingual), its tag picker (Turbo), its description and which controls it ignores.
//
// GET /v1/models lists the loaded families (with languages, tags, ignored_controls), then
// the aliases (`root`: the family they stand for). The picker shows one entry per family,
// with its undated aliases folded into the label: the dated snapshots (tts-1-1106,
// gpt-4o-mini-tts-2025-03-20) say nothing more.

const DATED = /-(\d{4}|\d{4}-\d{2}-\d{2})$/;

/** [{id, label, card}] per loaded family, in the server's order. */
export function familyEntries(cards) {
  const families = cards.filter((card) => !card.root);
  return families.map((card) => {
    const aliases = cards.filter((alias) => alias.root === card.id && !DATED.test(alias.id)).map((alias) => alias.id);
    return { id: card.id, label: aliases.length ? `${card.id} (${aliases.join(", ")})` : card.id, card };
  });
}

const languageNames = (() => {
  try {
    return new Intl.DisplayNames(["en"], { type: "language" });
  } catch {
    return null;
  }
})();

/** [value, label] for the language picker: detection first, then each language by name. */
export function languageOptions(card) {
  const named = card.languages.map((code) => [code, `${languageNames?.of(code) || code} (${code})`]);
  named.sort((a, b) => a[1].localeCompare(b[1]));
  return [["", "detect from the text"], ...named];
}

/**
 * Wire the parts of the page that follow the model: ``ui`` holds the language field and
 * picker, the tag picker and its list, the model note, the textarea and the control list;
 * ``changed()`` runs after a tag is inserted.
 */
export function modelDetails(ui, changed) {
  let cards = new Map();

  function insertTag(tag) {
    const { input } = ui;
    const start = input.selectionStart ?? input.value.length;
    const end = input.selectionEnd ?? start;
    const before = input.value.slice(0, start);
    const after = input.value.slice(end);
    const spaced = `${before && !/\s$/.test(before) ? " " : ""}${tag}${/^\s/.test(after) ? "" : " "}`;
    input.setRangeText(spaced, start, end, "end");
    input.focus();
    changed();
  }

  function show(familyId) {
    const card = cards.get(familyId);
    if (!card) return;
    const multilingual = (card.languages || []).length > 1;
    ui.languageField.hidden = !multilingual;
    if (multilingual) {
      const previous = ui.language.value;
      ui.language.replaceChildren(...languageOptions(card).map(([value, label]) => new Option(label, value)));
      ui.language.value = card.languages.includes(previous) ? previous : "";
    }
    const tags = card.tags || [];
    ui.tagPicker.hidden = tags.length === 0;
    ui.tagList.replaceChildren(...tags.map((tag) => {
      const button = Object.assign(document.createElement("button"), { type: "button", textContent: tag });
      button.dataset.tag = tag;
      button.addEventListener("click", () => insertTag(tag));
      return button;
    }));
    const ignored = card.ignored_controls || [];
    for (const input of ui.controls.querySelectorAll("input")) {
      const off = ignored.includes(input.name);
      input.disabled = off; // and left out of the request
      input.parentElement.classList.toggle("ignored", off);
      input.parentElement.title = off ? `${card.id} ignores this control` : "";
    }
    ui.note.textContent = card.description || "";
  }

  return {
    /** Remember the cards of the families and show the details of ``familyId``. */
    load(entries, familyId) {
      cards = new Map(entries.map((entry) => [entry.id, entry.card]));
      show(familyId);
    },
    show,
    /** The request's `language`: only for a multilingual model, only when picked. */
    language(familyId) {
      const card = cards.get(familyId);
      return card && card.languages.length > 1 && ui.language.value ? ui.language.value : null;
    },
  };
}
