"""Summarize finished runs: one markdown row per step with its state, wall time, peak memory and headline metrics.

Usage: python tools/summary.py OUT_MD STEP=SCRIPT/RUN_ID [STEP=SCRIPT/RUN_ID ...]   (paths relative to outputs/)
run_all.sh calls it at the end and writes outputs/summary.md; the table is printed too.
"""
import json
import os
import sys


def f(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def headline(script, m):
    """The few numbers a reader checks first, per script (metrics.json keys as each script writes them)."""
    e = m.get("eval", {})
    if script == "ddpm_states":
        return f"NLL {f(m.get('nll'))} (floor {f(m.get('nll_floor'))}), nn_dist {f(m.get('nn_dist'), '.4f')}"
    if script == "classifier_guidance_states":
        return (f"worst state {m.get('worst_state', '-')}: on state {f(m.get('min_on_state'))}, "
                f"max NLL gap {f(m.get('max_nll_gap'))}")
    if script in ("ddpm_mnist_cfg", "edm_mnist"):
        s = (f"FID {f(e.get('fid'), '.2f')} (floor {f(e.get('fid_floor'), '.2f')}, N={e.get('n', '-')}), "
             f"confidence {f(e.get('mean_top_prob'))}")
        return s + (f", class acc {f(e.get('class_accuracy'))}" if "class_accuracy" in e else "")
    if script == "ddim_sample":
        t = m.get("headline", {})
        return (f"50-step FID ratio {f(t.get('fid_ratio_50'))}, speed-up {f(t.get('speedup_50'), '.1f')}x, "
                f"inversion PSNR@100 {f(t.get('psnr_100'), '.1f')} dB")
    if script == "edm_posterior":
        return "; ".join(f"{k}: PSNR {f(v.get('psnr_unobserved'), '.1f')} dB, judge {f(v.get('judge_accuracy'), '.2f')}"
                         for k, v in m.get("experiments", {}).items())
    if script == "svd_posterior":
        return "; ".join(f"{r['setting']} {r['matrix']}: k95 {r['k95']}, PR {r['participation_ratio']:.2f}"
                         for r in m.get("svd", []))
    if script == "posterior_calibration":
        rows = [r for r in m.get("rows", []) if r.get("sampler") == "tweedie"]
        return "; ".join(f"{r['prior']} {100 * r['observed']:g}% {r['steps']} steps: mean error {r['mean_error']:.3f}"
                         for r in rows if r["steps"] == max(q["steps"] for q in rows))
    if script == "emnist_ddp":
        return (f"class acc {f(e.get('class_accuracy'))} (judge on real {f(e.get('judge_test_accuracy'))}), "
                f"FID {f(e.get('fid'), '.2f')} (floor {f(e.get('fid_floor'), '.2f')}), world size {m.get('world_size', '-')}")
    return ""


def main():
    out_md, rows = sys.argv[1], ["| step | run | state | wall | peak memory | headline |", "|---|---|---|---|---|---|"]
    root = os.path.dirname(out_md) or "."
    for item in sys.argv[2:]:
        step, run = item.split("=", 1)
        d = os.path.join(root, run)
        status, metrics = {}, {}
        for name, target in (("status.json", status), ("metrics.json", metrics)):
            try:
                with open(os.path.join(d, name)) as fh:
                    target.update(json.load(fh))
            except (OSError, ValueError):
                pass
        wall, rss = metrics.get("wall_time_s"), metrics.get("peak_rss_mb")  # rss: the process (rank 0's), not a GPU
        rows.append(f"| {step} | {run} | {status.get('state', 'missing')} | {f(wall, '.0f') + ' s' if wall else '-'} | "
                    f"{f(rss, '.0f') + ' MB' if rss else '-'} | {headline(run.split('/')[0], metrics)} |")
    text = "\n".join(rows) + "\n"
    with open(out_md, "w") as fh:
        fh.write("# run_all.sh summary\n\n" + text)
    print(text, end="")


if __name__ == "__main__":
    main()
