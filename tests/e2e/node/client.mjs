// A Node application as a user writes it: the SDK reads OPENAI_BASE_URL, OPENAI_API_KEY,
// AZURE_OPENAI_ENDPOINT and AZURE_OPENAI_API_KEY, which `replay-proxy run` sets.
import OpenAI, { AzureOpenAI } from "openai";

const prompt = process.argv[2];
const client = new OpenAI({ maxRetries: 0 });
const reply = await client.chat.completions.create({
  model: "gpt-4o-mini", seed: 7, messages: [{ role: "user", content: prompt }],
});
console.log(`chat: ${reply.choices[0].message.content}`);

const stream = await client.chat.completions.create({
  model: "gpt-4o-mini", seed: 7, stream: true, messages: [{ role: "user", content: prompt }],
});
let streamed = "";
for await (const chunk of stream) streamed += chunk.choices[0]?.delta?.content ?? "";
console.log(`stream: ${streamed}`);

// Node's AzureOpenAI takes OPENAI_BASE_URL over AZURE_OPENAI_ENDPOINT when both are set (run
// sets both), so an application that talks to both services names its Azure base URL.
const azure = new AzureOpenAI({
  baseURL: `${process.env.AZURE_OPENAI_ENDPOINT}/openai`, apiVersion: "2024-10-21", maxRetries: 0,
});
const embedding = await azure.embeddings.create({ model: "embed", input: prompt });
console.log(`azure embedding: ${embedding.data[0].embedding.slice(0, 3).join(",")}`);

if (process.argv[3] === "--swallow-a-miss") {
  try {
    await client.chat.completions.create({
      model: "gpt-4o-mini", seed: 8, messages: [{ role: "user", content: "never recorded" }],
    });
  } catch (error) {
    console.log(`swallowed: ${error.status}`);
  }
}
