// Decoders for the console API's JSON. Each checks the shape it was given and names the first
// field that differs ("overview: keys[2].not_after: expected a number, got null"), so a change
// on the server side shows up as one clear message in the error banner instead of a page that
// half renders. The API's types are inferred from these decoders: one description of the
// contract, not two.

export type Decoder<T> = (value: unknown, path: string) => T;
export type Infer<D> = D extends Decoder<infer T> ? T : never;

export class DecodeError extends Error {
  constructor(path: string, expected: string, value: unknown) {
    super(`${path}: expected ${expected}, got ${describe(value)}`);
    this.name = "DecodeError";
  }
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "string") return `the string ${JSON.stringify(value.slice(0, 40))}`;
  if (typeof value === "object") return "an object";
  if (value === undefined) return "nothing (field missing)";
  return `${typeof value} ${String(value)}`;
}

export const str: Decoder<string> = (v, p) => {
  if (typeof v !== "string") throw new DecodeError(p, "a string", v);
  return v;
};

export const num: Decoder<number> = (v, p) => {
  if (typeof v !== "number" || !Number.isFinite(v)) throw new DecodeError(p, "a number", v);
  return v;
};

export const bool: Decoder<boolean> = (v, p) => {
  if (typeof v !== "boolean") throw new DecodeError(p, "true or false", v);
  return v;
};

/** `null`, or (for forward compatibility) a missing field, decodes to `null`. */
export function nullable<T>(d: Decoder<T>): Decoder<T | null> {
  return (v, p) => (v === null || v === undefined ? null : d(v, p));
}

export function arr<T>(d: Decoder<T>): Decoder<T[]> {
  return (v, p) => {
    if (!Array.isArray(v)) throw new DecodeError(p, "an array", v);
    return v.map((item, i) => d(item, `${p}[${i}]`));
  };
}

/** An object with (at least) these fields; unknown fields are dropped. */
export function obj<F extends Record<string, Decoder<unknown>>>(
  fields: F,
): Decoder<{ [K in keyof F]: Infer<F[K]> }> {
  return (v, p) => {
    if (typeof v !== "object" || v === null || Array.isArray(v)) {
      throw new DecodeError(p, "an object", v);
    }
    const src = v as Record<string, unknown>;
    const out: Record<string, unknown> = {};
    for (const [name, d] of Object.entries(fields)) {
      out[name] = d(src[name], p ? `${p}.${name}` : name);
    }
    return out as { [K in keyof F]: Infer<F[K]> };
  };
}
