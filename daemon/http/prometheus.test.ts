import { expect, it } from "vitest";
import { renderPrometheus } from "./prometheus.ts";

it("renders families in the Prometheus text format", () => {
  const text = renderPrometheus([
    { name: "ckptd_up", help: "1 while serving", type: "gauge", samples: [{ value: 1 }] },
    {
      name: "ckptd_updates_total",
      help: "Updates by result",
      type: "counter",
      samples: [
        { labels: { state: "succeeded" }, value: 3 },
        { labels: { state: 'we"ird\n' }, value: Number.NaN },
      ],
    },
  ]);
  expect(text).toBe(
    [
      "# HELP ckptd_up 1 while serving",
      "# TYPE ckptd_up gauge",
      "ckptd_up 1",
      "# HELP ckptd_updates_total Updates by result",
      "# TYPE ckptd_updates_total counter",
      'ckptd_updates_total{state="succeeded"} 3',
      'ckptd_updates_total{state="we\\"ird\\n"} 0',
      "",
    ].join("\n"),
  );
});
