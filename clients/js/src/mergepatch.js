// JSON merge patch (RFC 7396), as the server applies it to state documents (protocol.md 14.2).

const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);

/** `target` with `patch` applied; neither is changed. */
export function mergePatch(target, patch) {
  if (!isObject(patch)) return patch;
  const result = isObject(target) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else result[key] = mergePatch(result[key] ?? null, value);
  }
  return result;
}
