import { describe, expect, it } from "vitest";
import { FirstFit } from "./first-fit.ts";

describe("FirstFit", () => {
  it("finds no bin before one is opened", () => {
    expect(new FirstFit(64).find(0)).toBe(-1);
  });

  it("gives the first bin, in the order opened, with room enough", () => {
    const bins = new FirstFit(64);
    for (let k = 0; k < 5; k++) expect(bins.open()).toBe(k);
    bins.set(0, 8);
    bins.set(1, 40);
    bins.set(2, 8);
    bins.set(3, 60);
    bins.set(4, 0);
    expect(bins.find(8)).toBe(0);
    expect(bins.find(9)).toBe(1);
    expect(bins.find(41)).toBe(3);
    expect(bins.find(61)).toBe(-1);
    expect(bins.find(0)).toBe(0);
  });

  it("keeps every bin's room as it grows past any size", () => {
    const bins = new FirstFit(1000);
    for (let k = 0; k < 1500; k++) {
      bins.open();
      bins.set(k, k % 997);
    }
    expect(bins.find(996)).toBe(996);
    expect(bins.find(997)).toBe(-1);
    bins.set(996, 0);
    expect(bins.find(996)).toBe(-1);
    expect(bins.find(995)).toBe(995);
    expect(bins.find(1)).toBe(1);
    expect(bins.open()).toBe(1500);
    expect(bins.find(997)).toBe(1500);
  });
});
