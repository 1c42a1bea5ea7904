/** A timer handle, as `setTimeout` returns it in Node and in browsers (internal: not in any public type). */
export type Timer = ReturnType<typeof setTimeout>;
