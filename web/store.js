// This origin's own storage (IndexedDB "folio"): the last global model a tab
// received ("models"), and the text this device trains on where devices bring
// their own ("texts"). Nothing here is sent anywhere.
const stores = ["models", "texts"];

// Runs `use(store)` in a transaction on `name`; resolves with its request's
// result once committed.
export function store(name, mode, use) {
  return new Promise((resolve, reject) => {
    const opening = indexedDB.open("folio", 2);
    opening.onupgradeneeded = () => {
      for (const missing of stores.filter((s) => !opening.result.objectStoreNames.contains(s))) {
        opening.result.createObjectStore(missing);
      }
    };
    opening.onerror = () => reject(opening.error);
    opening.onsuccess = () => {
      const db = opening.result;
      const transaction = db.transaction(name, mode);
      const request = use(transaction.objectStore(name));
      transaction.oncomplete = () => { db.close(); resolve(request.result); };
      transaction.onerror = () => { db.close(); reject(transaction.error); };
      transaction.onabort = () => { db.close(); reject(transaction.error); };
    };
  });
}

// The device's own text, kept across reloads; "" when there is none.
export const ownText = () => store("texts", "readonly", (texts) => texts.get("own")).then((text) => text ?? "");
export const keepText = (text) => store("texts", "readwrite", (texts) => texts.put(text, "own"));
// The text, and the model fine-tuned on it (which it shaped): both gone.
export const deleteText = () => store("texts", "readwrite", (texts) => texts.delete("own"))
  .then(() => store("models", "readwrite", (models) => models.delete("mine")));
