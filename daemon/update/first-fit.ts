/**
 * First fit over bins of one capacity: which is the first bin, in the order they were opened,
 * with room for n more bytes. A tree holds the most room below each node (the bins are its
 * leaves), so finding and filling take O(log bins) however many bins are open.
 */
export class FirstFit {
  /** Node i's children are 2i and 2i+1; bin k is the leaf at #leaves + k; -1 where no bin is. */
  #room = new Float64Array([-1, -1]);
  #leaves = 1;
  #bins = 0;

  constructor(readonly capacity: number) {}

  /** The first bin with at least `bytes` of room, or -1 when none has. */
  find(bytes: number): number {
    const room = this.#room;
    if (!((room[1] as number) >= bytes)) return -1;
    let i = 1;
    while (i < this.#leaves) i = (room[2 * i] as number) >= bytes ? 2 * i : 2 * i + 1;
    return i - this.#leaves;
  }

  /** Opens a bin with all its room, and gives its number (0, 1, ...). */
  open(): number {
    if (this.#bins === this.#leaves) this.#grow();
    const k = this.#bins++;
    this.set(k, this.capacity);
    return k;
  }

  /** Says how much room bin k has left. */
  set(k: number, room: number): void {
    const tree = this.#room;
    let i = this.#leaves + k;
    tree[i] = room;
    for (i >>= 1; i >= 1; i >>= 1) tree[i] = Math.max(tree[2 * i] as number, tree[2 * i + 1] as number);
  }

  #grow(): void {
    const old = this.#room;
    const leaves = this.#leaves * 2;
    const tree = new Float64Array(2 * leaves).fill(-1);
    tree.set(old.subarray(this.#leaves, 2 * this.#leaves), leaves);
    for (let i = leaves - 1; i >= 1; i--) tree[i] = Math.max(tree[2 * i] as number, tree[2 * i + 1] as number);
    this.#room = tree;
    this.#leaves = leaves;
  }
}
