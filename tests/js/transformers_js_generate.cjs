// Load a laser-export ONNX folder from local disk with transformers.js (Node) and generate greedily.
// usage: node transformers_js_generate.cjs <npm prefix holding @huggingface/transformers> <models root> <folder>
//        <dtype: default | fp32 | fp16 | q8 ...> <prompt> <max_new_tokens>
// prints one JSON line: {"version", "ids" (prompt + generated), "logits_type", "logits" (last position, raw data)}
const path = require("path");
const { createRequire } = require("module");

const [prefix, root, name, dtype, prompt, maxNew] = process.argv.slice(2);
const req = createRequire(path.join(path.resolve(prefix), "package.json"));
const { env, AutoTokenizer, AutoModelForCausalLM } = req("@huggingface/transformers");
const version = env.version;

(async () => {
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = path.resolve(root) + path.sep;
  const tokenizer = await AutoTokenizer.from_pretrained(name);
  const model = await AutoModelForCausalLM.from_pretrained(name, dtype === "default" ? {} : { dtype });
  const inputs = tokenizer(prompt, { add_special_tokens: false });
  const out = await model.generate({ ...inputs, max_new_tokens: Number(maxNew), do_sample: false });
  const logits = (await model(inputs)).logits;
  const last = logits.slice(null, -1, null);
  console.log(JSON.stringify({
    version,
    ids: Array.from(out.tolist()[0], Number),
    logits_type: last.type,
    logits: Array.from(last.data, Number),
  }));
})().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
