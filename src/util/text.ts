/**
 * Makes text from a stream or an image safe for a one-line message: control
 * and non-ASCII bytes become \xNN escapes, and long runs are cut, so a
 * damaged name can neither break the line nor flood the terminal.
 */
export function printable(text: string, max = 120): string {
  const escaped = text.replace(/[\x00-\x1f\x7f-\uffff]/g, (c) => {
    const code = c.charCodeAt(0);
    return code <= 0xff ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
  });
  return escaped.length > max ? `${escaped.slice(0, max)}…` : escaped;
}
